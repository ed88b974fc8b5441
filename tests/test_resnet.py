"""The ResNet family: presets (torchvision's parameter counts), width/depth multipliers, the CIFAR
and ImageNet stems, and the CIFAR stem's export (its code travels with the weights)."""

import subprocess
import sys

import pytest
import torch

from bigtrain.config import ConfigError, ModelSection, validate
from bigtrain.models.resnet import architecture, build_resnet

# torchvision.models.resnet{18,34,50}(num_classes=1000): sum(p.numel() for p in model.parameters())
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def resnet(num_classes=10, channels=3, image_size=32, **keys):
    return build_resnet(ModelSection(name="resnet", **keys), channels, num_classes, image_size)


@pytest.mark.parametrize("preset", sorted(TORCHVISION_PARAMS))
def test_presets_have_torchvisions_parameter_counts(preset):
    model = resnet(1000, image_size=224, preset=preset)
    assert model.config.model_type == "resnet"  # 224 px: the ImageNet stem, transformers' own class
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[preset]


def test_multipliers_scale_widths_and_depths():
    arch = architecture(ModelSection(name="resnet", preset="resnet50", width_mult=0.25, depth_mult=0.5), 224)
    assert arch["embedding_size"] == 16 and arch["hidden_sizes"] == [64, 128, 256, 512]
    assert arch["depths"] == [2, 2, 3, 2] and arch["layer_type"] == "bottleneck"
    explicit = architecture(ModelSection(name="resnet", widths=[10, 20], depths=[1, 3], layer_type="basic"), 224)
    assert explicit["hidden_sizes"] == [10, 20] and explicit["embedding_size"] == 10  # mult 1: as written
    small = ModelSection(name="resnet", widths=[4, 36], depths=[1, 2], width_mult=0.5, depth_mult=0.1)
    assert architecture(small, 8)["depths"] == [1, 1] and architecture(small, 8)["hidden_sizes"] == [8, 16]


@pytest.mark.parametrize("size, stem, stage1", [(32, "auto", 32), (28, "auto", 28), (64, "auto", 16),
                                                (32, "imagenet", 8), (64, "cifar", 64)])
def test_stems_and_the_resolution_stage_1_sees(size, stem, stage1):
    model = resnet(image_size=size, preset="resnet18", width_mult=0.125, stem=stem).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, size, size), output_hidden_states=True)
    # hidden_states: the stem's output (stage 1's input), then each stage's
    assert out.hidden_states[0].shape[-2:] == (stage1, stage1)
    assert [h.shape[-1] for h in out.hidden_states[1:]] == [-(-stage1 // 2**k) for k in range(4)]  # stride 2, padded
    assert out.logits.shape == (2, 10)


def test_a_preset_owns_the_layout():
    with pytest.raises(ConfigError, match=r"model.depths: model.preset \(resnet18\) sets the layout"):
        validate({"task": "image_classification", "model": {"name": "resnet", "preset": "resnet18", "depths": [1]},
                  "data": {"path": "x"}})
    cfg = validate({"task": "image_classification", "model": {"name": "resnet", "preset": "resnet50"},
                    "data": {"path": "x"}})
    assert "widths" not in cfg.to_dict()["model"]  # the saved config.yaml validates again
    assert validate(cfg.to_dict()).model.preset == "resnet50"


def test_imagenet_stem_exports_as_plain_resnet(tmp_path):
    resnet(image_size=224, widths=[8, 16], depths=[1, 1]).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_cifar_stem_exports_with_its_code_and_reloads_without_bigtrain(tmp_path):
    model = resnet(channels=1, image_size=28, preset="resnet18", width_mult=0.125).eval()
    model.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save((x, model(pixel_values=x).logits), tmp_path / "ref.pt")
    # a fresh interpreter that never imports bigtrain: the model class comes from the exported file
    code = ("import sys, torch; from transformers import AutoModelForImageClassification as A; "
            "m = A.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); x, ref = torch.load(sys.argv[2]); "
            "assert 'bigtrain' not in sys.modules; print(type(m).__name__, m.config.stem, "
            "(m(pixel_values=x).logits - ref).abs().max().item())")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), str(tmp_path / "ref.pt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    name, stem, diff = proc.stdout.split()
    assert (name, stem) == ("StemResNetForImageClassification", "cifar") and float(diff) < 1e-5


def test_sync_batchnorm_keeps_the_state_dict_and_is_refused_under_deepspeed():
    from bigtrain.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

    torch.manual_seed(0)
    plain = resnet(widths=[8, 16], depths=[1, 1])
    torch.manual_seed(0)
    synced = convert_sync_batchnorm(resnet(widths=[8, 16], depths=[1, 1]), torch.device("cpu"))
    assert any(isinstance(m, SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    want = plain.state_dict()
    assert synced.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in synced.state_dict().items())
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(synced(pixel_values=x).logits, plain(pixel_values=x).logits)  # one process: plain BatchNorm
    assert torch.equal(synced.resnet.embedder.embedder.normalization.running_mean,
                       plain.resnet.embedder.embedder.normalization.running_mean)
    with pytest.raises(ConfigError, match="model.sync_batchnorm: for strategy.name ddp or fsdp"):
        validate({"task": "image_classification", "model": {"name": "resnet", "sync_batchnorm": True},
                  "data": {"path": "x"}, "strategy": {"name": "deepspeed"}})
