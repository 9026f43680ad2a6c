"""A ToMeSD result's ``.pt2`` in a diffusers pipeline (``tome_fx.export`` of a
``DiffusionModule``, loaded with ``diffusion.files.load_pt2``), and the command line's one-line
errors for ``--method tomesd``."""
import json
import warnings
import zipfile

import pytest
import torch

import tome_fx
from tome_fx.cli.main import main
from tome_fx.diffusion.files import load_pt2
from tome_fx.errors import ExportError, ShapeError

from diffusion_models import dit, relative, sd15


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """SD1.5-shaped UNet, ToMeSD at 0.5, written to a .pt2 and loaded. The example timestep is
    an integer, as DDIM's, so the pipeline's calls reuse the graph optimize captured."""
    g = torch.Generator().manual_seed(0)
    example = {"sample": torch.randn(2, 4, 16, 16, generator=g),
               "timestep": torch.full((2,), 999), "encoder_hidden_states":
               torch.randn(2, 77, 32, generator=g)}
    module = tome_fx.optimize(sd15(), method="tomesd", ratio=0.5, use_rand=False,
                              example_inputs=example)
    path = tmp_path_factory.mktemp("pt2") / "unet.pt2"
    result = tome_fx.export(module, path, verbose=False)
    return module, result, load_pt2(path)


def test_archive(exported):
    """Batch, height and width dynamic, checked at other sizes; the program takes keywords;
    the archive holds the config, the forward's inputs, the class and the plan."""
    module, result, loaded = exported
    assert {"sample[0]", "sample[2]", "sample[3]"} <= set(result.dynamic)
    assert {"batch", "height", "width"} <= set(result.axes) and not result.notes
    assert {"batch 1", "batch 3", "sample[2]=24", "sample[3]=24"} <= set(result.max_diff)
    assert max(result.max_diff.values()) <= 1e-4
    with zipfile.ZipFile(result.path) as archive:  # torch.export.save's extra_files
        extra = {name.rsplit("/", 1)[1]: archive.read(name).decode()
                 for name in archive.namelist() if "/extra/" in name}
    assert json.loads(extra["config.json"])["sample_size"] == 16
    meta = json.loads(extra["tome_fx.json"])
    assert meta["class"] == "UNet2DConditionModel"
    assert meta["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert [n for n, *_ in meta["signature"]][:4] == [*meta["inputs"], "class_labels"]
    assert "downsample" in extra["plan.txt"]
    x, e, t = torch.randn(3, 4, 24, 16), torch.randn(3, 77, 32), torch.full((3,), 500)
    with torch.no_grad():  # the program itself: torch.export.load(path).module()
        got = loaded.program(sample=x, timestep=t, encoder_hidden_states=e)["sample"]
        want = module(x, t, e).sample
    assert relative(got, want) <= 1e-4


def _pipe(unet):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4,
                        norm_num_groups=32).eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_pipeline(exported):
    """``pipe.unet = load_pt2(path)``: the images of the pipeline with the DiffusionModule
    itself, at two image sizes and one and two images per prompt (guidance: batch 2 and 4)."""
    module, _, loaded = exported
    pipe = _pipe(module)
    text, empty = torch.randn(1, 77, 32), torch.randn(1, 77, 32)

    def images(height, width, n):
        return pipe(prompt_embeds=text, negative_prompt_embeds=empty, num_inference_steps=2,
                    height=height, width=width, num_images_per_prompt=n, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    cases = [(16, 16, 1), (24, 16, 2)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        want = [images(*c) for c in cases]
    assert not [w for w in seen if "captured" in str(w.message)]  # one graph takes them all
    pipe.unet = loaded
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 16
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
    for case, ours in zip(cases, want):
        got = images(*case)
        assert got.shape == ours.shape == (case[2], 3, case[0], case[1])
        assert relative(got, ours) <= 1e-4


def test_calls_and_errors(exported, tmp_path):
    """Called as the model: positional or keyword, a 0-d or Python timestep, return_dict; an
    input the file was not exported with, a size it does not take, another dtype: one line."""
    module, _, loaded = exported
    x, e = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = module(x, torch.full((2,), 500), e).sample
        calls = [loaded(x, torch.tensor(500), e, return_dict=False)[0],
                 loaded(sample=x, timestep=500, encoder_hidden_states=e).sample,
                 loaded(x, torch.tensor([500]), encoder_hidden_states=e,
                        cross_attention_kwargs=None, return_dict=False)[0]]
    assert all(relative(got, want) <= 1e-4 for got in calls)
    with pytest.raises(ShapeError, match=r"unet.pt2 was exported without the input "
                                         r"'timestep_cond': export the module with example "
                                         r"inputs that include timestep_cond"):
        loaded(x, 500, e, timestep_cond=torch.randn(2, 4))
    with pytest.raises(ShapeError, match=r"does not take these inputs \(sample \(2, 4, 15, 16\)"):
        loaded(torch.randn(2, 4, 15, 16), 500, e)
    with pytest.raises(TypeError, match=r"whose dtype cannot change after export: optimize and "
                                        r"export the model in torch.float16"):
        loaded.half()
    assert loaded.to("cpu") is loaded and loaded.device.type == "cpu"
    other = tmp_path / "linear.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(2, 2),)), other)
    with pytest.raises(ExportError, match=r"linear.pt2 is not a diffusion model's .pt2 from "
                                          r"tome_fx.export \(no tome_fx.json\): load it with "
                                          r"torch.export.load"):
        load_pt2(other)
    assert loaded.conv_in.in_channels == 4  # the model's class built on the meta device
    with pytest.raises(AttributeError, match=r"has no 'enable_freeu': a .pt2 is a fixed program"):
        loaded.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)

    # .to(device) moves the program (torch.export's device pass); last, as it moves the
    # fixture's module (a second load costs as much as the rest of this test)
    assert loaded.to("meta") is loaded and loaded.device.type == "meta"
    x, e = torch.randn(2, 4, 16, 24, device="meta"), torch.randn(2, 77, 32, device="meta")
    assert loaded(x, 500, e).sample.shape == (2, 4, 16, 24)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

def _error(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tome-fx: error: ") and err.count("\n") == 1, err
    return err.strip()


def test_cli_tomesd_needs_diffusers(capsys):
    """tomesd on a timm ViT: optimize refuses it (no token grid); the CLI says what it needs."""
    err = _error(capsys, "report", "timm:vit_tiny_patch16_224", "--method", "tomesd")
    assert err == ("tome-fx: error: --method tomesd needs a diffusers model: a pipeline folder "
                   "with model_index.json (its unet/ or transformer/) or a diffusers model folder "
                   "(config.json with _class_name); timm:vit_tiny_patch16_224 is a "
                   "VisionTransformer: use --method tome")


def test_cli_budget_names_cli_options(tmp_path, capsys):
    """A budget below what the ops can reach names --merge and --flops-budget."""
    dit(size=8, layers=1).save_pretrained(tmp_path / "dit")
    err = _error(capsys, "report", tmp_path / "dit", "--flops-budget", "0.2")
    assert "merge more ops (--merge attn,crossattn,mlp) or pass --flops-budget >= 0." in err
    assert "merge_mlp" not in err and "flops_budget" not in err
    err = _error(capsys, "report", tmp_path / "dit", "--flops-budget", "0.01", "--merge",
                 "attn,crossattn,mlp")
    assert "merge more ops" not in err and "pass --flops-budget >= 0." in err
