"""The one home of configuration.

Every tunable of the system lives in :class:`Settings`. Values come from (highest first) keyword
arguments, environment variables prefixed ``XAI_`` (for example ``XAI_DEVICE=cpu``) and the defaults
below. Functions take a ``settings`` argument (default: ``Settings()``, read from the environment at
that moment) instead of reading a process-wide object, so that worker processes and tests each build
their own; the CLI and the MONAI Label app build one and pass it down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XAI_", extra="ignore")

    device: str = Field("auto", description="'auto' picks CUDA when present, else the CPU; or 'cpu', 'cuda:0'")
    num_threads: int = Field(0, description="torch CPU threads; 0 leaves torch's default")

    # Model grid: every model input is resampled to this axis-aligned grid (LPS, mm), centred on the
    # physical centre of the input volume.
    model_grid_size: int = Field(64, description="voxels per side of the cubic model grid")
    model_grid_spacing_mm: float = Field(3.0, description="isotropic spacing of the model grid, mm")

    # Safety limits for untrusted input.
    max_voxels: int = Field(512**3, description="largest volume accepted, in voxels")

    weights_dir: Path = Field(REPO_ROOT / "xai_core" / "models" / "weights",
                              description="shipped, read-only model weights and cards")
    user_weights_dir: Path = Field(REPO_ROOT / "runs" / "weights",
                                   description="fine-tuned weights are written here, never over shipped ones")
    samples_dir: Path = Field(REPO_ROOT / "data" / "samples", description="sample studies for the server")

    # Saliency masks.
    mask_levels_percent: tuple[float, ...] = Field((1.0, 5.0, 10.0, 20.0),
                                                   description="top-k%% of brain voxels per saliency level")
    # Bounds on the adaptive (Otsu) mask, as fractions of brain voxels: 0.2 % of a brain is ~3 mL,
    # the size of a small metastasis; 20 % keeps a diffuse map from flooding the mask.
    mask_min_fraction: float = Field(0.002, description="smallest adaptive mask, fraction of brain voxels")
    mask_max_fraction: float = Field(0.20, description="largest adaptive mask, fraction of brain voxels")

    # Registration of the input to the MNI152 template (xai_core.registration). 2.5 mm keeps one
    # affine registration within a few seconds on 2 cores; the atlas is still read at 1 mm.
    registration_spacing_mm: float = Field(2.5, description="grid the template is registered on, mm")
    registration_sampling_fraction: float = Field(0.05, description="share of fixed voxels the metric samples")
    registration_iterations: int = Field(200, description="optimizer iterations per resolution level")
    registration_bspline: bool = Field(False, description="add a deformable B-spline stage after the affine")
    registration_bspline_mesh_mm: float = Field(60.0, description="B-spline control point spacing, mm")
    # Quality gates (thresholds measured in docs/atlas.md): below them a registration is likely_failed.
    registration_min_edge_ncc: float = Field(0.5, description="least NCC of the gradient magnitudes of warped input "
                                             "and template in the brain grown by 5 mm")
    registration_min_coverage: float = Field(0.6, description="least fraction of the template brain inside a "
                                             "skull-on input's foreground")
    registration_min_dice: float = Field(0.8, description="least Dice of warped input foreground and template brain")
    registration_det_range: tuple[float, float] = Field((0.5, 2.0),
                                                        description="allowed volume change of the affine part")

    # Atlas labelling (xai_core.atlas).
    atlas_min_structure_fraction: float = Field(0.01, description="structures below this share of the mask "
                                                                  "are not listed")
    atlas_max_structures: int = Field(12, description="at most this many structures are listed, largest first")
    atlas_crossing_fraction: float = Field(0.25, description="a connected region crosses the midline when its "
                                                             "smaller side holds at least this share of it")
    atlas_min_component_fraction: float = Field(0.05, description="components below this share of the mask do "
                                                                  "not decide the side; nor does a side holding "
                                                                  "less than this share of a multi-part region")

    # Counterfactual in-filling (xai_core.counterfactual).
    counterfactual_dilation_mm: float = Field(3.0, description="the in-filled region is the mask grown by this")
    counterfactual_blend_mm: float = Field(2.0, description="Gaussian sigma of the blend at the region's border")

    # Drafted report (xai_core.report).
    report_llm_max_new_tokens: int = Field(160, description="tokens an LLM may generate for the impression")

    # Asking (xai_core.ask: `xai ask`, the server's vqa task): explainer parameters a request does not set.
    # RE-LIG at 8 noisy samples x 16 steps is the lead's setting for brain-vqa (128 forward+backward
    # passes); IG on the pixels at 32 steps matches the explainer's own default. The bounds are the
    # explainers' own (param_bounds), so that a bad environment value fails here, not in a request.
    vqa_relig_n_samples: int = Field(8, ge=1, le=64, description="RE-LIG noisy samples per answer")
    vqa_relig_n_steps: int = Field(16, ge=2, le=128, description="RE-LIG path steps per noisy sample")
    vqa_ig_n_steps: int = Field(32, ge=2, le=256, description="integrated-gradients path steps per answer")

    # Explanation server (monai_app); a MONAI Label `--conf token ...` / `--conf max_upload_mb ...` wins.
    token: str = Field("", description="bearer token every server route requires (XAI_TOKEN); empty = no auth")
    max_upload_mb: float = Field(512.0, description="largest request body the server accepts, MiB")

    # Untrusted input (issue 17): limits of xai_core.io.read_untrusted_image (every upload) and of the
    # server's JSON parameters. 8 voxels per axis is below any clinical series (a thick-slab MR has 20+
    # slices) yet refuses the 1-4 voxel "volumes" that carry nothing to explain. Decoding costs about
    # voxels x (2 x stored bytes + 5): a 256^3 float32 MR about 210 MiB, a 512x512x400 int16 CT about
    # 900 MiB, a 512^3 float32 volume about 1.6 GiB (refused unless the per-upload limit is raised).
    untrusted_min_size: int = Field(8, description="fewest voxels along each axis of an uploaded volume")
    untrusted_max_decode_mb: float = Field(1024.0, description="most memory one upload may need to decode, MiB")
    untrusted_memory_budget_mb: float = Field(2048.0, description="memory all uploads decoding at once may "
                                                                  "need together (one budget per process), MiB")
    untrusted_budget_wait_s: float = Field(10.0, description="how long an upload waits for room in the decode "
                                                             "budget before it is refused (429)")
    untrusted_gzip_slack_mb: float = Field(1.0, description="compressed voxel data may inflate to the declared "
                                                            "size plus the larger of this (MiB) ...")
    untrusted_gzip_slack_fraction: float = Field(0.10, description="... and this fraction of the declared size")
    max_params_kb: int = Field(1024, description="largest JSON parameter body or 'params' form field, KiB")
    max_params_depth: int = Field(32, description="deepest nesting of arrays/objects in JSON parameters")

    # Faithfulness and sanity (issue 15): xai_core.faithfulness, xai_core.sanity, xai_core.engines.
    # Deletion / insertion curves work on the model grid: it is split into cubes (squares in 2-D) of
    # faithfulness_patch_mm, ranked by their mean saliency; each of faithfulness_steps steps removes
    # (or restores) the next 1/steps of the cubes that hold foreground, and only their foreground voxels
    # are filled. 12 mm is 4 voxels at 3 mm, the size of one CAM cell at the default CAM layer: smaller
    # cubes rank interpolation artefacts, larger ones mix lesion and healthy tissue.
    faithfulness_patch_mm: float = Field(12.0, description="side of a removed cube (square in 2-D), mm")
    faithfulness_steps: int = Field(20, description="curve points after the unperturbed start")
    # 'log' by default: a lesion is a few of the ~300 brain cubes, so on a linear schedule every method's
    # curve falls at step 1 and the areas do not separate methods (docs/evaluation.md); geometric steps
    # from 1 cube to all of them spend most points where the evidence is.
    faithfulness_schedule: Literal["linear", "log"] = Field(
        "log", description="cubes removed by step k of n: 'linear' round(k n / steps); 'log' geometric from 1 "
                           "cube to all n (repeated counts dropped, so a small n gives fewer points)")
    # 'mean' by default: a blur keeps a diffuse lesion (a glioma) looking like one, so deleting it changes
    # nothing (measured in docs/evaluation.md); a flat cube at the mean intensity removes it.
    faithfulness_fill: str = Field("mean", description="what a removed cube holds: 'mean', 'blur', 'template' "
                                                       "(registered MNI152) or a registered in-filler ('mae')")
    faithfulness_blur_mm: float = Field(12.0, description="Gaussian sigma of the 'blur' fill, mm")
    faithfulness_batch: int = Field(8, description="perturbed inputs per forward pass")
    faithfulness_foreground: float = Field(0.1, description="model-grid voxels with normalised intensity above "
                                                            "this are foreground (the brain rule of the pipeline)")
    sanity_seed: int = Field(0, description="seed of the re-initialised layers in the randomisation cascade")
    sanity_max_rank_correlation: float = Field(0.5, description="a map whose Spearman rank correlation with the "
                                                                "original stays at or above this after the whole "
                                                                "model is randomised fails the sanity check")
    sanity_verdicts: Path = Field(REPO_ROOT / "runs" / "sanity" / "verdicts.json",
                                  description="per-method sanity verdicts (xai sanity writes them); findings of "
                                              "a method that failed carry a quality flag")
    ray_cpus_per_worker: float = Field(1.0, description="CPUs one Ray worker (one model) asks for")
    ray_gpus_per_worker: float = Field(1.0, description="GPUs one Ray worker asks for when the cluster has GPUs")


def get_settings() -> Settings:
    """Settings from the environment as it is now (not cached: pass the object down instead of
    calling this again)."""
    return Settings()


def resolve_device(spec: str | None = None):
    """Torch device for ``spec`` ('auto' -> CUDA when available, else CPU; None -> ``XAI_DEVICE``)."""
    import torch

    spec = spec or Settings().device
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
