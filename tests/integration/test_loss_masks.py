"""Per-clip loss masks from the folder to the step: prepare finds them, the cache pools them into the latent grid,
and the loss takes nothing from where a mask is black."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from happyhorse_train.data.prepare import load_manifest, prepare_clips, write_dataset_folder
from happyhorse_train.demo.clips import DEMO_CLIPS, write_demo_clips
from happyhorse_train.training import flow_matching as fm
from happyhorse_train.training.config_checks import check_train_config
from happyhorse_train.training.run_setup import set_up_run
from happyhorse_train.training.step import batch_loss
from happyhorse_train.training.trainer import batches
from tests.conftest import run_script, train_config
from tests.integration.conftest import FAST, RULES


def half_mask(size: tuple[int, int]) -> Image.Image:
    """White (train) on the right half, black on the left."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, width // 2 :] = 255
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("masks")
    clips = write_demo_clips(folder / "clips", DEMO_CLIPS[:4])
    for clip in clips[:3]:  # the fourth trains everywhere
        half_mask(_first_frame(clip).size).save(clip.with_name(f"{clip.stem}.mask.png"))
    result = prepare_clips(folder / "clips", RULES, num_workers=1, progress=False)
    write_dataset_folder(result, folder / "clips", folder / "dataset", RULES)
    return folder / "dataset", result


def _first_frame(clip) -> Image.Image:
    import decord

    return Image.fromarray(decord.VideoReader(str(clip))[0].asnumpy())


def test_prepare_finds_the_masks_and_inspect_names_them(masked_dataset):
    dataset, result = masked_dataset
    rows = load_manifest(dataset).to_list()
    assert sum(bool(row["mask"]) for row in rows) == 3 and all(row["mask_fingerprint"] for row in rows if row["mask"])
    assert "3 file(s) have a loss mask" in "\n".join(result.notes)
    assert len(result.probes) == 4 + 3 and result.files_probed == 7  # the masks are probed like their clips
    again = prepare_clips(dataset.parent / "clips", RULES, num_workers=1, progress=False, known=result.probes)
    assert again.files_probed == 0 and again.rows == result.rows  # and a re-run decodes none of them again
    run = run_script("data_tools/inspect_dataset.py", str(dataset), "--plot", str(dataset / "p.png"))
    assert run.returncode == 0, run.stderr
    assert "loss masks: 3 source file(s)" in run.stdout


def test_a_half_mask_takes_nothing_from_its_black_half(masked_dataset, demo_model_dir, tmp_path):
    dataset, _ = masked_dataset
    cfg = train_config(*FAST, f"model.path={demo_model_dir}", f"data.dataset={dataset}", f"output_dir={tmp_path}",
                       "trainer.max_steps=2", "data.batch_size=1", "data.caption_dropout=0")
    check_train_config(cfg)
    run = set_up_run(cfg)
    predictions = []
    run.transformer.register_forward_hook(lambda module, args, output: predictions.append(output[0]))

    masked_seen = 0
    for batch, generators in batches(run):
        if "loss_mask" not in batch:
            continue
        mask = batch["loss_mask"]
        # Pooled into the latent grid: 0 and 1 away from the edge, which the resize to the bucket blurs.
        half = mask.shape[-1] // 2
        assert torch.all(mask[..., : half - 1] == 0) and torch.all(mask[..., half + 1 :] == 1)
        predictions.clear()
        losses = batch_loss(batch, generators, run.step_context)
        [prediction] = predictions
        prediction.retain_grad()
        losses.loss.backward()
        black, white = (mask == 0).expand_as(prediction), (mask == 1).expand_as(prediction)
        assert torch.all(prediction.grad[black] == 0)  # the black part adds nothing to the gradient
        assert torch.all(prediction.grad[white] != 0)
        masked_seen += 1
        break
    assert masked_seen == 1


def test_masked_errors_equal_the_errors_of_the_unmasked_part_alone():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 3, 4, 6, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 3, 4, 6, generator=generator)
    mask = torch.zeros(2, 1, 3, 4, 6)
    mask[..., 3:] = 1
    errors = fm.squared_errors(prediction, target, mask)
    torch.testing.assert_close(errors, fm.squared_errors(prediction[..., 3:], target[..., 3:]))
    errors.sum().backward()
    assert torch.all(prediction.grad[..., :3] == 0) and torch.all(prediction.grad[..., 3:] != 0)
    assert fm.squared_errors(prediction, target, torch.zeros_like(mask)).tolist() == [0.0, 0.0]


def test_latent_mask_pools_as_the_vae_compresses():
    from happyhorse_train.data.loss_masks import latent_mask

    pixels = torch.zeros(9, 16, 16)
    pixels[1:3] = 1  # half of latent frame 1's four pixel frames
    pixels[5:, :8] = 1  # the top half of latent frame 2
    pooled = latent_mask(pixels, temporal=4, spatial=8)
    assert pooled.shape == (1, 3, 2, 2)
    assert pooled[0, 0].eq(0).all() and pooled[0, 1].eq(0.5).all()
    assert pooled[0, 2, 0].eq(1).all() and pooled[0, 2, 1].eq(0).all()
