"""Experiments (issue 7): every config composes, the tiny sweeps run as Hydra multiruns (Table 6's with
W&B offline) and tabulate, collect_results marks a failed run, and bad configs fail before any model."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT, load_tool, run_tool_in_process
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmldm_ae.autoencoder import AEConfig
from mmldm_ae.engine.sweeps import EvalPlan, ExperimentConfig, check_sweep_overrides
from mmldm_data.config import ConfigError, dataset_config_from, to_typed
from mmldm_data.config import compose as compose_checked
from mmldm_dit.config import SCHEMAS
from mmldm_dit.train_dit import EvalSampling

EndToEndConfig = load_tool("demo.py").EndToEndConfig
CONF = REPO_ROOT / "conf"
# The config groups each root config chooses from (nested choices such as dataset.mel come with their parent).
GROUPS = {
    "data": ("dataset",),
    "train_vae": ("dataset", "vae", "train", "wandb"),
    "train_ae": ("dataset", "vae", "ae", "train", "wandb", "ablation"),
    "train_dit": ("dataset", "dit", "dit_loss", "train", "wandb"),
    "train_dit_long": ("dataset", "dit", "dit_loss", "train", "wandb"),
    "sample": (),
    "demo": (),
    "synth_bench": (),
    "shape_check": (),
    "table1_paper": ("dataset",),
    "table1_tiny": ("dataset",),
}
# Every section a tool turns into a dataclass: the groups' schemas and the root configs' own sections.
SECTIONS = {
    **SCHEMAS,
    "experiment": ExperimentConfig,
    "evaluate": EvalPlan,
    "evaluate_sampling": EvalSampling,
}
SWEEPS = {
    "sensitivity": "train_ae",
    "sensitivity_tiny": "train_ae",
    "ablation": "train_ae",
    "ablation_tiny": "train_ae",
    "scale": "train_dit",
    "scale_tiny": "train_dit",
}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def typed_sections(cfg) -> None:
    """What the tools do first: every section of a composed config into its dataclass."""
    dataset_config_from(cfg)
    for key, schema in SECTIONS.items():
        if key not in cfg or key == "dataset" or (key == "vae" and OmegaConf.is_missing(cfg.vae, "weights")):
            continue
        to_typed(schema, OmegaConf.to_container(cfg[key], resolve=True))


def choices() -> list[tuple[str, str, str]]:
    return [
        (name, group, option)
        for name, groups in GROUPS.items()
        for group in groups
        for option in options(group)
    ]


@pytest.mark.parametrize(("config_name", "group", "option"), choices())
def test_every_group_option_composes_and_validates(config_name, group, option):
    overrides = [f"{group}={option}", *(["run_dir=/tmp/unused"] if config_name.startswith("train") else [])]
    if group == "ablation":  # the rows read their UNet and VAEs from the sweep's ablation_unet / ablation_vae
        overrides += ["+ablation_unet={sd: u}", "+ablation_vae={original: a, finetuned: b}"]
    cfg = compose_checked(CONF, config_name, overrides)
    typed_sections(cfg)


@pytest.mark.parametrize("config_name", sorted(path.stem for path in CONF.glob("*.yaml")))
def test_groups_lists_every_choice_of_every_root_config(config_name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True)
    chosen = {name for name in cfg.hydra.runtime.choices if not (name.startswith("hydra/") or "@" in name)}
    assert chosen == set(GROUPS[config_name])


def composed(group: str, option: str) -> dict:
    return OmegaConf.to_container(compose_checked(CONF, None, [f"+{group}={option}"])[group])


def inherited(group: str, defaults: list) -> dict:
    """What a preset's defaults list supplies before its own keys (`_self_` comes last in every preset)."""
    node = OmegaConf.create()
    for entry in defaults[:-1]:
        if isinstance(entry, dict):  # /other_group@key: option
            ((target, option),) = entry.items()
            other, _, key = target.lstrip("/").partition("@")
            node = OmegaConf.merge(node, {key: composed(other, option)})
        else:  # the group's schema or another of its presets
            node = OmegaConf.merge(node, composed(group, entry))
    return OmegaConf.to_container(node)


def leaves(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        flat |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return flat


@pytest.mark.parametrize(("group", "option"), [(group, name) for group in SCHEMAS for name in options(group)])
def test_presets_hold_only_what_differs_from_what_they_inherit(group, option):
    own = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    defaults = own.pop("defaults")
    assert defaults[0] in ("schema", *options(group)) and defaults[-1] == "_self_", defaults
    base = leaves(inherited(group, defaults))
    repeated = {key: value for key, value in leaves(own).items() if key not in base or base[key] == value}
    assert not repeated, f"conf/{group}/{option}.yaml repeats what it inherits: {repeated}"


@pytest.mark.slow
def test_cfg_job_prints_the_dataclass_defaults_the_yaml_leaves_out():
    cfg = OmegaConf.create(run_tool_in_process("train_ae.py", "--cfg", "job").stdout)
    assert cfg.train.keep_checkpoints == 2 and cfg.dataset.index_workers == 0 and cfg.ae.unet_init is None
    assert not any("keep_checkpoints" in path.read_text() for path in (CONF / "train").glob("*.yaml"))
    assert "index_workers" not in (CONF / "dataset" / "synthetic.yaml").read_text()


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_every_sweep_composes_with_its_grid(sweep):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=SWEEPS[sweep], overrides=[f"+sweep={sweep}"], return_hydra_config=True)
    assert cfg.experiment.study == sweep.removesuffix("_tiny")
    assert (
        OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.override_dirname}"
    )  # named from overrides
    grid = {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}
    if sweep.startswith("sensitivity"):
        assert grid == {"ae.w_kl": ["1e-8", "1e-7"], "ae.w_cls": ["1.0", "0.3", "0.1"]}
        assert cfg.ae.w_con == cfg.ae.w_cls
    elif sweep == "ablation":
        assert grid["ablation"] == options("ablation")
    elif sweep == "scale":
        assert grid == {"dit": ["S", "B", "L"]}
    assert cfg.wandb.group == sweep.removesuffix("_tiny")


def test_submitit_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train_ae",
            overrides=["+sweep=sensitivity", "hydra/launcher=slurm"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == cfg.hydra.launcher.tasks_per_node


def test_ablation_rows_are_cumulative():
    toggles = ("learnable_prompt", "content_embedding", "class_embedding", "semantic_context", "adversarial")
    previous = {toggle: False for toggle in toggles}
    for row in options("ablation"):
        ae = OmegaConf.load(CONF / "ablation" / f"{row}.yaml").ae
        current = {toggle: bool(ae[toggle]) for toggle in toggles}
        assert all(current[t] for t in toggles if previous[t]), row  # nothing switched on is switched off
        previous = current
    assert all(previous.values())


# Paper Table 5, cumulative: what each row changes (decoder from SD's UNet, learnable prompt, latent
# pooling = content embedding, class token + loss, semantic context + contrastive loss, fine-tuned VAE,
# adversarial loss).
TABLE_5 = {
    "0_base": (False, False, False, False, False, False, False),
    "1_init": (True, False, False, False, False, False, False),
    "2_prompt": (True, True, False, False, False, False, False),
    "3_pooling": (True, True, True, False, False, False, False),
    "4_class": (True, True, True, True, False, False, False),
    "5_semantic": (True, True, True, True, True, False, False),
    "6_vae_decoder": (True, True, True, True, True, True, False),
    "7_adversarial": (True, True, True, True, True, True, True),
}
README_ABLATION = [  # the README's Table 5 command, less data_root
    "+sweep=ablation",
    "dataset=aist",
    "ae=paper",
    "vae=sd",
    "train=ae_paper",
    "ablation_unet.sd=/models/sd-v1-4/unet",
    "ablation_vae.original=/models/sd-v1-4/vae",
    "ablation_vae.finetuned=outputs/runs/vae-aist-sd/vae",
    "run_dir=/tmp/unused",
]


def test_table_5_rows_are_what_the_paper_says_with_the_readme_command():
    assert options("ablation") == sorted(TABLE_5)
    readme = (REPO_ROOT / "README.md").read_text()
    assert all(override in readme for override in README_ABLATION[5:8])
    for row, expected in TABLE_5.items():
        cfg = compose_checked(CONF, "train_ae", [*README_ABLATION, f"ablation={row}"])
        ae = to_typed(AEConfig, OmegaConf.to_container(cfg.ae, resolve=True))
        effective = (
            ae.unet_init == "/models/sd-v1-4/unet",
            ae.learnable_prompt,
            ae.content_embedding,
            ae.class_embedding and ae.w_cls > 0,
            ae.semantic_context and ae.w_con > 0,
            cfg.vae.weights == "outputs/runs/vae-aist-sd/vae",
            ae.adversarial and ae.w_adv > 0,
        )
        assert effective == expected, row
        assert cfg.experiment.label == row


def test_no_ablation_row_decides_how_the_content_embedding_pools():
    # Table 5's "latent average pooling" row switches the content embedding on; ae.content_pooling
    # (flatten: the authors' code, avg: the paper's text) is the same choice in every row.
    for row in TABLE_5:
        cfg = compose_checked(
            CONF, "train_ae", [*README_ABLATION, f"ablation={row}", "ae.content_pooling=avg"]
        )
        assert cfg.ae.content_pooling == "avg", row


def test_a_key_every_ablation_row_decides_is_refused_on_the_command_line():
    study = ExperimentConfig(study="ablation")
    with pytest.raises(ConfigError, match="ae.unet_init is decided by each row.*ablation_unet.sd=PATH"):
        check_sweep_overrides(study, ["ablation=0_base", "ae.unet_init=/models/sd-v1-4/unet"])
    check_sweep_overrides(study, README_ABLATION)
    check_sweep_overrides(ExperimentConfig(), ["ae.unet_init=/models/sd-v1-4/unet"])  # outside the study


def test_demo_configs_compose():
    configs = {
        name: to_typed(
            EndToEndConfig,
            OmegaConf.to_container(compose_checked(CONF, name, []), resolve=False) | {"out": "x"},
        )
        for name in ("demo", "synth_bench", "shape_check")
    }
    assert configs["demo"].classes == configs["synth_bench"].classes == "colour_pitch"
    # The held-apart check: the benchmark's settings and bars on the shape/timbre class set.
    shape_check, bench = configs["shape_check"], configs["synth_bench"]
    assert shape_check.classes == "shape_timbre" and shape_check.title == "shape-check"
    assert shape_check.results_json == "docs/shape_check.json" != bench.results_json
    assert (shape_check.train_ae, shape_check.train_dit, shape_check.sampling, shape_check.bars) == (
        bench.train_ae,
        bench.train_dit,
        bench.sampling,
        bench.bars,
    )
    with pytest.raises(ConfigError, match="classes must be one of colour_pitch, shape_timbre"):
        to_typed(EndToEndConfig, {"classes": "shapes"})


@pytest.mark.parametrize(
    ("tool", "override", "key"),
    [
        ("train_ae.py", "ae.w_klx=1", "w_klx"),
        ("train_ae.py", "ae=huge", "ae"),
        ("train_ae.py", "evaluate.resolution=100", "evaluate.resolution"),
        ("train_ae.py", "experiment.study=scaling", "experiment.study"),
        ("train_dit.py", "dit.patch_size=3", "dit.patch_size"),
        ("train_dit.py", "dit=XXL", "dit"),
        ("train_vae.py", "train.lr=-1", "train.lr"),
    ],
)
@pytest.mark.slow
def test_bad_overrides_fail_before_any_model_with_the_key(tool, override, key, tmp_path):
    result = run_tool_in_process(
        tool,
        override,
        f"run_dir={tmp_path / 'run'}",
        "ae_run=none" if tool == "train_dit.py" else "data_root=none",
        check=False,
    )
    assert result.returncode != 0
    assert key in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
