"""Every option of every config group in conf/ composes (Hydra compose API) and resolves. Unknown
names raise a Hydra error naming the value."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from helpers import CONF_DIR, SAME_PAIR, compose_config
from plmcal import lens, models
from plmcal.module import TemperatureCalibrator, validate_method
from plmcal.prompt import PromptSpec

# Groups of the primary config. conf/hydra is Hydra's own group, so separate tests check it.
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml")))
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def option_id(case: tuple[str, str]) -> str:
    return f"{case[0]}={case[1]}"


@pytest.mark.parametrize("case", OPTIONS, ids=option_id)
def test_option_composes(case):
    group, option = case
    cfg = compose_config([f"{group}={option}"])
    assert isinstance(OmegaConf.to_container(cfg, resolve=True), dict)


@pytest.mark.parametrize("case", [c for c in OPTIONS if c[0] != "experiment"], ids=option_id)
def test_option_selected(case):
    # The composed group contains the option file's own values (interpolations compared unresolved).
    group, option = case
    written = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    own = {k: v for k, v in written.items() if k != "defaults"}
    chosen = OmegaConf.to_container(compose_config([f"{group}={option}"])[group], resolve=False)
    assert {k: chosen.get(k) for k in own} == own


def test_groups_found():
    assert {"pair", "dataset", "method", "prompt", "logger", "experiment"} <= set(GROUPS)


def test_experiment_main():
    cfg = compose_config(["experiment=main"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.method == "vanilla,ts_oracle,daca,dual_align"


def test_experiment_main_pair():
    cfg = compose_config(["experiment=main"])
    assert cfg.pair.name == SAME_PAIR


def test_experiment_main_multirun():
    cfg = compose_config(["experiment=main"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_hydra_callback():
    cfg = compose_config([], return_hydra_config=True)
    assert cfg.hydra.callbacks.comparison_table._target_ == "plmcal.callbacks.ComparisonTable"


def test_paths_resolve():
    cfg = compose_config([])
    assert cfg.paths.root_dir == str(CONF_DIR.parent)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PLMCAL_CACHE", str(tmp_path))
    assert compose_config([]).paths.cache_dir == str(tmp_path)


@pytest.mark.parametrize("group", ["pair", "dataset", "method"])
def test_unknown_option(group):
    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/no-such-option'"):
        compose_config([f"{group}=no-such-option"])


def test_unknown_key():
    with pytest.raises(ConfigCompositionException, match="lamda"):
        compose_config(["method=dual_align", "method.lamda=2"])


def method_config(name: str) -> dict:
    return OmegaConf.to_container(compose_config([f"method={name}"]).method, resolve=True)


METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
FITTED = [name for name in METHODS if method_config(name).get("fit", True)]


@pytest.mark.parametrize("name", [n for n in FITTED if method_config(n).get("calibrator", "temperature") == "temperature"])
def test_method_builds(name):
    method = method_config(name)
    assert TemperatureCalibrator(method).temperature.item() == pytest.approx(float(method["init_temperature"]))


@pytest.mark.parametrize("name", [n for n in FITTED if method_config(n).get("calibrator", "temperature") != "temperature"])
def test_scaling_method_builds(name):
    method = method_config(name)
    expected = {"vector": 2 * 5, "matrix": 5 * 5 + 5}[method["calibrator"]]
    assert TemperatureCalibrator(method, n_columns=5).n_params == expected


@pytest.mark.parametrize("name", [n for n in METHODS if n not in FITTED])
def test_unfitted_method_validates(name):
    validate_method(method_config(name))


def test_vanilla_fits_nothing():
    assert compose_config(["method=vanilla"]).method.fit is False


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "prompt").glob("*.yaml")))
def test_prompt_builds(name):
    spec = PromptSpec.from_config(compose_config([f"prompt={name}"]).prompt)
    assert spec.name == name


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "pair").glob("*.yaml")))
def test_pair_plm_spec(name):
    spec = models.ModelSpec.from_config(compose_config([f"pair={name}"]).pair.plm)
    assert spec.source in ("embedded", "hub")


def test_readout_settings():
    settings = lens.ReadoutSettings(**OmegaConf.to_container(compose_config([]).readout, resolve=True))
    assert settings.lens


ABLATIONS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("ablation_*.yaml"))


def sweep_params(experiment: str) -> dict[str, list[str]]:
    cfg = compose_config([f"experiment={experiment}"], return_hydra_config=True)
    return {key: [v.strip() for v in str(value).split(",")] for key, value in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_ablation_grid(experiment):
    params = sweep_params(experiment)
    assert len(params["dataset"]) >= 4
    assert len(params["split.seed"]) >= 3


@pytest.mark.parametrize("experiment", ABLATIONS)
def test_ablation_cells_valid(experiment):
    # Every swept method value composes into a method that passes validation before any forward pass.
    from plmcal.module import validate_method

    params = sweep_params(experiment)
    method_keys = [key for key in params if key == "method" or key.startswith("method.")]
    assert method_keys, f"{experiment} sweeps no method setting"
    for key in method_keys:
        for value in params[key]:
            cfg = compose_config([f"experiment={experiment}", f"{key}={value}"])
            if key.startswith("method."):
                assert key.split(".", 1)[1] in cfg.method, f"{key} is not a key of method {cfg.method.name}"
            validate_method(OmegaConf.to_container(cfg.method, resolve=True))


def test_diagnosis_experiment_supports():
    assert sweep_params("diagnosis")["diagnosis.support"] == ["options", "full_vocab", "topk"]


def test_experiment_seeds():
    cfg = compose_config(["experiment=seeds"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["split.seed"] == "1,2,3,4,5"


def test_experiment_daca_mmlu_sweep():
    cfg = compose_config(["experiment=daca_mmlu"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.prompt == ",".join(f"daca_mmlu_{i}" for i in range(1, 6))


def test_experiment_daca_mmlu_split():
    cfg = compose_config(["experiment=daca_mmlu"])
    assert cfg.split.by == "subject"
    assert cfg.dataset.name == "mmlu"


def test_mmlu_wordings_differ():
    instructions = {compose_config([f"prompt=daca_mmlu_{i}"]).prompt.instruction for i in range(1, 6)}
    assert len(instructions) == 5


def test_mmlu_wording_1_is_daca():
    daca, first = compose_config(["prompt=daca"]).prompt, compose_config(["prompt=daca_mmlu_1"]).prompt
    assert {k: v for k, v in daca.items() if k != "name"} == {k: v for k, v in first.items() if k != "name"}
