"""cxrdist.models: the study's CNN layer for layer, timm models, local pretrained files, fast offline
errors."""

from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from cxrdist import models
from cxrdist.config import ModelConfig
from cxrdist.models import (
    ModelError,
    SeedCNN,
    check_input_size,
    create_model,
    gradcam_target_layer,
    num_parameters,
    seed_cnn,
)

torch.set_num_threads(1)


def describe(module: nn.Module) -> list[tuple]:
    """Leaf layers as (type, defining arguments), in forward order."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            out.append(("Conv2d", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding))
        elif isinstance(m, nn.MaxPool2d):
            out.append(("MaxPool2d", m.kernel_size, m.stride))
        elif isinstance(m, nn.Linear):
            out.append(("Linear", m.in_features, m.out_features))
        elif isinstance(m, nn.ReLU):
            out.append(("ReLU",))
    return out


# ----------------------------------------------------------------------------------------------- seed_cnn


def test_seed_cnn_is_the_study_network() -> None:
    model = seed_cnn(in_chans=3)
    assert describe(model) == [
        ("Conv2d", 3, 6, (5, 5), (1, 1), (0, 0)),
        ("ReLU",),
        ("MaxPool2d", 8, 8),
        ("Conv2d", 6, 16, (5, 5), (1, 1), (0, 0)),
        ("ReLU",),
        ("MaxPool2d", 8, 8),
        ("Linear", 16, 100),
        ("ReLU",),
        ("Linear", 100, 50),
        ("ReLU",),
        ("Linear", 50, 4),
    ]
    # 456 + 2416 (convs) + 1700 + 5050 + 204 (linears)
    assert num_parameters(model) == 9826
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 4)
    one = seed_cnn(num_classes=4)  # the default: one gray channel, the same function (see below)
    assert describe(one)[0] == ("Conv2d", 1, 6, (5, 5), (1, 1), (0, 0))
    assert describe(one)[1:] == describe(model)[1:]
    assert one(torch.randn(2, 1, 128, 128)).shape == (2, 4)


def test_one_channel_seed_cnn_computes_the_study_networks_function() -> None:
    """The study's 3-channel first layer over gray replicated to RGB (ImageNet normalisation per channel)
    equals a folded 1-channel layer over the gray image (one average normalisation): same outputs."""
    from cxrdist.augment import eval_transform, normalize_stats

    torch.manual_seed(0)
    rgb = seed_cnn(in_chans=3).eval()
    gray = seed_cnn(in_chans=1).eval()
    state = dict(rgb.state_dict())
    w, b = models.fold_rgb_stem(
        state["features.0.weight"], state["features.0.bias"], normalize_stats(3), normalize_stats(1)
    )
    state["features.0.weight"], state["features.0.bias"] = w, b
    gray.load_state_dict(state)
    images = torch.randint(0, 256, (8, 1, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        expected = rgb(eval_transform(images, 3))
        got = gray(eval_transform(images, 1))
        # The first layer alone, before pooling hides differences: equal within float rounding.
        first_rgb = rgb.features[0](eval_transform(images, 3))
        first_gray = gray.features[0](eval_transform(images, 1))
    torch.testing.assert_close(first_gray, first_rgb, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    fresh = seed_cnn(in_chans=1).eval()(eval_transform(images, 1))
    assert not torch.allclose(got, fresh)  # the comparison is not vacuous


def test_in_chans_auto_is_one_only_where_it_is_exact() -> None:
    assert models.input_channels(ModelConfig(name="seed_cnn")) == 1
    assert models.input_channels(ModelConfig(name="resnet18")) == 3  # zero padding: not exact
    assert models.input_channels(ModelConfig(name="seed_cnn", in_chans=3)) == 3  # the study's form stays
    assert create_model(ModelConfig(name="seed_cnn", in_chans=3), 4).features[0].in_channels == 3


def test_seed_cnn_feature_shapes_at_128() -> None:
    feats = []
    model = seed_cnn(in_chans=3)
    for i in (2, 4, 5):
        model.features[i].register_forward_hook(lambda _m, _i, o: feats.append(tuple(o.shape)))
    model(torch.randn(1, 3, 128, 128))
    assert feats == [(1, 6, 15, 15), (1, 16, 11, 11), (1, 16, 1, 1)]


def test_seed_cnn_input_size() -> None:
    check_input_size("seed_cnn", 128)
    check_input_size("seed_cnn", 100)
    check_input_size("seed_cnn", 163)
    assert seed_cnn()(torch.randn(1, 1, 163, 163)).shape == (1, 4)
    for bad in (99, 164, 224):
        with pytest.raises(ModelError, match="seed_cnn needs 100..163 px"):
            check_input_size("seed_cnn", bad)
    with pytest.raises(ModelError, match="got 224x224"):
        seed_cnn()(torch.randn(1, 1, 224, 224))
    check_input_size("resnet18", 64)  # no fixed size
    with pytest.raises(ModelError, match="only 224x224"):
        check_input_size("vit_tiny_patch16_224", 128)


def test_seed_cnn_config_errors() -> None:
    assert isinstance(create_model(ModelConfig(name="seed_cnn"), 4), SeedCNN)
    with pytest.raises(ModelError, match="model.pretrained = false"):
        create_model(ModelConfig(name="seed_cnn", pretrained=True), 4)
    with pytest.raises(ModelError, match="drop_rate"):
        create_model(ModelConfig(name="seed_cnn", drop_rate=0.1), 4)


# ------------------------------------------------------------------------------------------- timm models


@pytest.mark.parametrize("in_chans", [1, 3])
def test_resnet18_scratch_forward_backward(in_chans: int) -> None:
    model = create_model(ModelConfig(name="resnet18", in_chans=in_chans), 4)
    assert model.conv1.in_channels == in_chans and model.fc.out_features == 4
    # timm's 1000-class resnet18 has 11,689,512; the head shrinks to 4 classes, the stem to in_chans
    assert num_parameters(model) == 11_689_512 - 513 * 1000 + 513 * 4 - (3 - in_chans) * 64 * 7 * 7
    x = torch.randn(3, in_chans, 64, 64)
    logits = model(x)
    assert logits.shape == (3, 4)
    logits.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_unknown_model_name() -> None:
    with pytest.raises(ModelError, match=r"resnet18.*timm.list_models"):
        create_model(ModelConfig(name="resnt18"), 4)
    with pytest.raises(ModelError, match=r"Invalid pretrained tag.*resnet18\.a1_in1k"):
        create_model(ModelConfig(name="resnet18.nope"), 4)
    with pytest.raises(ModelError, match="Invalid pretrained tag"):
        check_input_size("resnet18.nope", 128)
    assert create_model(ModelConfig(name="resnet18.tv_in1k"), 4).fc.out_features == 4


def test_gradcam_target_layer() -> None:
    model = seed_cnn()
    layer = gradcam_target_layer(model)
    assert layer is model.features[4]
    shapes = []
    layer.register_forward_hook(lambda _m, _i, o: shapes.append(tuple(o.shape)))
    model(torch.randn(1, 1, 128, 128))
    assert shapes == [(1, 16, 11, 11)]
    resnet = create_model(ModelConfig(name="resnet18"), 4)
    assert gradcam_target_layer(resnet) is resnet.layer4
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.Flatten())
    assert gradcam_target_layer(plain) is plain[2]
    with pytest.raises(ModelError, match="no Conv2d"):
        gradcam_target_layer(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ pretrained weights


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path, Path]:
    """A 1000-class timm resnet18 state dict (random init stands in for ImageNet) as .pth and .safetensors."""
    torch.manual_seed(0)
    sd = timm.create_model("resnet18", num_classes=1000).state_dict()
    folder = tmp_path_factory.mktemp("weights")
    torch.save(sd, folder / "resnet18.pth")
    safetensors.torch.save_file(sd, str(folder / "resnet18.safetensors"))
    return sd, folder / "resnet18.pth", folder / "resnet18.safetensors"


def assert_backbone_from(model: nn.Module, sd: dict[str, torch.Tensor], in_chans: int) -> None:
    own = model.state_dict()
    for key, value in sd.items():
        if key.startswith("fc."):
            continue
        if key == "conv1.weight" and in_chans == 1:
            value = value.sum(dim=1, keepdim=True)  # timm's adapt_input_conv folds RGB into gray
        assert torch.equal(own[key], value), key
    assert own["fc.weight"].shape == (4, 512) and own["fc.bias"].shape == (4,)
    # the head is new: no row of it is any row of the file's 1000-class head
    assert torch.cdist(own["fc.weight"], sd["fc.weight"]).min() > 1e-3


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
@pytest.mark.parametrize("in_chans", [3, 1])
def test_pretrained_from_local_file(imagenet_like, suffix: str, in_chans: int) -> None:
    sd, pth, safe = imagenet_like
    path = pth if suffix == "pth" else safe
    torch.manual_seed(1)  # a different init than the file's, so an unloaded tensor cannot pass by chance
    cfg = ModelConfig(name="resnet18", pretrained=True, pretrained_file=str(path), in_chans=in_chans)
    model = create_model(cfg, 4)
    assert_backbone_from(model, sd, in_chans)
    assert model(torch.randn(2, in_chans, 64, 64)).shape == (2, 4)


def test_pretrained_file_errors(imagenet_like, tmp_path: Path) -> None:
    sd, _, _ = imagenet_like
    cfg = ModelConfig(name="resnet18", pretrained=True, pretrained_file=str(tmp_path / "nope.pth"))
    with pytest.raises(ModelError, match="nope.pth': no such file"):
        create_model(cfg, 4)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(ModelError, match="cannot read a state dict"):
        create_model(ModelConfig(name="resnet18", pretrained=True, pretrained_file=str(junk)), 4)
    # keys under another prefix would leave every layer at random init if loaded non-strictly
    renamed = tmp_path / "renamed.pth"
    torch.save({f"backbone.{k}": v for k, v in sd.items()}, renamed)
    with pytest.raises(ModelError, match="not a timm 'resnet18' state dict: it lacks 100 of the model's"):
        create_model(ModelConfig(name="resnet18", pretrained=True, pretrained_file=str(renamed)), 4)
    # a resnet34 file fits resnet18 tensor for tensor; only its extra blocks give it away
    r34 = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), r34)
    with pytest.raises(
        ModelError, match=r"state dict: it has 80 tensors the model does not \(e.g. layer1.2."
    ):
        create_model(ModelConfig(name="resnet18", pretrained=True, pretrained_file=str(r34)), 4)
    wrong = tmp_path / "resnet50.pth"
    torch.save(timm.create_model("resnet50").state_dict(), wrong)
    with pytest.raises(ModelError, match="does not fit resnet18"):
        create_model(ModelConfig(name="resnet18", pretrained=True, pretrained_file=str(wrong)), 4)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face and torch hub caches at an empty folder."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf"


def test_offline_without_file_fails_fast(empty_caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE.*model\.pretrained_file"):
        create_model(ModelConfig(name="resnet18", pretrained=True), 4)
    assert time.perf_counter() - start < 1.0


def test_unreachable_hub_fails_fast(empty_caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not flagged offline, but no network: a clear error within ~1 s, not timm's download retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if models._reachable(huggingface_hub.constants.ENDPOINT):
        pytest.skip("the Hugging Face hub is reachable from here")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot be\s+reached.*model\.pretrained_file"):
        create_model(ModelConfig(name="resnet18", pretrained=True), 4)
    assert time.perf_counter() - start < 3.0
    start = time.perf_counter()
    with pytest.raises(ModelError, match="is read from the Hugging Face hub, which cannot be reached"):
        create_model(ModelConfig(name="hf-hub:timm/resnet18.a1_in1k"), 4)
    assert time.perf_counter() - start < 3.0


def test_reachability_probe_sees_a_local_server() -> None:
    """The probe really connects: a listening socket on 127.0.0.1 is reachable, a closed port is not."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert models._reachable(f"http://127.0.0.1:{port}")
    assert not models._reachable(f"http://127.0.0.1:{port}")


def test_hub_weights_from_local_cache_offline(empty_caches: Path, imagenet_like, monkeypatch) -> None:
    """Weights already in the Hugging Face cache load offline, from the cache, without any request."""
    sd, _, safe = imagenet_like
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k
    folder = empty_caches / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(safe.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    model = create_model(ModelConfig(name="resnet18", pretrained=True), 4)
    assert_backbone_from(model, sd, 3)
