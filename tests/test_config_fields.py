"""Every field of every config acts, or is refused before anything runs, on both kinds of data.

The configs are all built from one base (`config_lib.base_config`), so none loses a field. Then every field of
that base is changed, one at a time, to another valid value, on a memory run and on a files run of the same
image folder, through the real command line (`main(argv)` in this process) with `--plan`: the job checks the
config and prints what it would do, built from what it builds (`pipeline.plan`: the data source, the teacher's
origin, each model's learning-rate schedule, each method's loss and targets on a probe batch). A field acts
when the plan changes; otherwise the run must end with one `error:` line that names the field. The run
identities in the plan copy the config, so they are left out of the comparison: they say nothing of what a
field does.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import serialization
from test_cli import run_main

from debkd_jax import config_lib, method_configs, models, pipeline, processes, workdir_lib

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.py"))
KINDS = {"memory": "memory", "files": "stream"}

# Another valid value for each field of the base config (debkd.py:smoke), as the command line writes it.
VALUES = {
    "seed": "1",
    "seeds": "2",
    "dtype": "bfloat16",
    "conv_backward": "xla",
    "progress": "True",
    "overwrite": "True",
    "distributed": "True",
    "cluster.coordinator_address": "localhost:1",
    "cluster.num_processes": "2",
    "cluster.process_id": "0",
    "cluster.initialization_timeout": "60",
    "cluster.heartbeat_timeout": "10",
    "data.source": "digits",
    "data.cache_dir": "{tmp}/another_cache",
    "data.image_size": "24",
    "data.max_per_class": "30",
    "data.digits_classes": "10",
    "data.tfds_data_dir": "{tmp}/tfds",
    "data.use_dataset_test_split": "True",
    "data.augment": "True",
    "data.pipeline": "auto",
    "data.eval_crop": "1.0",
    "data.workers": "0",
    "data.logits_chunk_rows": "512",
    "data.views": "4",
    "data.mixup": "0.5",
    "targets": "online",
    "targets_top_k": "1",
    "teacher.checkpoint": "{checkpoint}",
    "teacher.logits": "{logits}",
    "teacher.variables": "{variables}",
    "teacher.folds": "2",
    "teacher.logits_dtype": "float16",
}
TRAINING_VALUES = {
    "model": "resnet8",
    "num_epochs": "3",
    "batch_size": "16",
    "eval_batch_size": "64",
    "learning_rate": "0.1",
    "momentum": "0.8",
    "weight_decay": "0.0001",
    "warmup_epochs": "0.5",
    "nesterov": "False",
    "lr_schedule": "step",
    "lr_decay_epochs": "(1,)",
    "lr_decay_rate": "0.5",
}
METHOD_VALUES = {
    "loss": "dkd",
    "transforms": "('rectify',)",
    "ki_mode": "per_class",
    "rectify_mode": "released",
    "temperature": "2.0",
    "num_regions": "8",
    "beta": "0.3",
    "alpha": "0.5",
    "lam": "0.3",
    "scale_by_t2": "False",
    "hint_weight": "0.5",
    "weight_schedule": "cos2",
    "warmup_epochs": "2",
}


def leaves(tree, prefix="") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(leaves(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def without_identities(node):
    if isinstance(node, dict):
        return {k: without_identities(v) for k, v in node.items() if k != "identity"}
    if isinstance(node, list):
        return [without_identities(v) for v in node]
    return node


@pytest.fixture(scope="module")
def setting(shapes_dir, tmp_path_factory):
    """The base command (debkd.py:smoke on conftest's image folder), and the files a teacher can come from."""
    tmp = tmp_path_factory.mktemp("fields")
    base = [
        f"--config={REPO_ROOT / 'configs' / 'debkd.py'}:smoke",
        f"--workdir={tmp / 'never_written'}",
        f"--config.data.source=folder:{shapes_dir}",
        f"--config.data.cache_dir={tmp / 'cache'}",
        "--plan",
    ]
    config = config_lib.load_config(f"{REPO_ROOT / 'configs' / 'debkd.py'}:smoke")
    config.data.source, config.data.cache_dir = f"folder:{shapes_dir}", str(tmp / "cache")
    model = models.get_model(config.teacher.model, 2)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.zeros((1, 32, 32, 3)))
    (tmp / "teacher.msgpack").write_bytes(serialization.to_bytes(variables))
    sources = {kind: pipeline.load_source(config, kind) for kind in KINDS}
    ids = np.concatenate([sources["memory"].splits[s].ids for s in ("train", "val", "test")])
    rng = np.random.default_rng(0)
    np.savez(tmp / "teacher.npz", ids=ids, logits=rng.normal(size=(len(ids), 2)).astype(np.float32))
    for kind, source in sources.items():  # a finished teacher of each kind's data, as a run leaves it
        folder = tmp / f"finished-{kind}" / "teacher"
        workdir_lib.save_variables(str(folder / "final"), variables)
        workdir_lib.write_json(str(folder / "teacher.json"), pipeline.teacher_meta(config, source))
    return {"base": base, "tmp": tmp}


def values_for(kind: str, setting) -> dict[str, str]:
    tmp = setting["tmp"]
    files = {
        "tmp": tmp,
        "checkpoint": tmp / f"finished-{kind}" / "teacher",
        "logits": tmp / "teacher.npz",
        "variables": tmp / "teacher.msgpack",
    }
    values = {path: value.format(**files) for path, value in VALUES.items()}
    for part in ("teacher", "student"):
        values.update({f"{part}.{k}": v for k, v in TRAINING_VALUES.items()})
    for name in ("CE", "KD", "DeBKD"):
        values.update({f"methods.{name}.{k}": v for k, v in METHOD_VALUES.items()})
    return values


def planned(args) -> tuple[int, dict | None, str]:
    if "--config.distributed=True" in args:  # the launching process supervises the job as a child process
        proc = processes.run(
            [sys.executable, "-m", "debkd_jax.main", *args],
            cwd=REPO_ROOT,
            timeout=240,
            env={**os.environ, "XLA_FLAGS": ""},
        )
    else:
        proc = run_main(args)
    plan = json.loads(proc.stdout) if proc.returncode == 0 else None
    return proc.returncode, plan, proc.stderr


def test_every_config_is_built_from_the_one_base():
    """No config loses a field of the base (as configs/paper.py once lost teacher.logits); none adds one but
    a sweep's block."""
    base = leaves(config_lib.base_config(()).to_dict())
    method_fields = set(method_configs.DEFAULTS)
    for path in CONFIGS:
        config = config_lib.load_config(str(path))
        fields = leaves({k: v for k, v in config.to_dict().items() if k != "methods"})
        assert set(fields) - {f for f in fields if f.startswith("sweep.")} == set(base) - {
            f for f in base if f.startswith("methods.")
        }, path.name
        for name, method in config.methods.items():
            assert set(method.keys()) == method_fields, (path.name, name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
def test_every_field_acts_or_is_refused_up_front(setting, kind):
    kind_args = [*setting["base"], f"--config.data.pipeline={KINDS[kind]}"]
    status, base_plan, err = planned(kind_args)
    assert status == 0, err[-3000:]
    assert base_plan["data"]["kind"] == kind
    base_plan = without_identities(base_plan)
    config = config_lib.load_config(f"{REPO_ROOT / 'configs' / 'debkd.py'}:smoke")
    fields = leaves(config.to_dict())
    values = values_for(kind, setting)
    assert set(fields) <= set(values), sorted(set(fields) - set(values))
    acted, refused, ignored = [], [], []
    for path in sorted(fields):
        if path == "data.pipeline" and kind == "memory":
            value = "stream"  # the other kind
        else:
            value = values[path]
        status, plan, err = planned([*kind_args, f"--config.{path}={value}"])
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        leaf = path.rsplit(".", 1)[-1]
        if status == 0 and without_identities(plan) != base_plan:
            acted.append(path)
        elif status == 2 and len(errors) == 1 and leaf in errors[0] and "Traceback" not in err:
            refused.append((path, errors[0]))
        else:
            ignored.append((path, status, errors[-1:] if errors else err[-300:]))
    assert not ignored, ignored
    # The refusals are of fields that cannot act on this data or with this base, each said in its own words.
    print(f"{kind}: {len(acted)} fields act; refused: " + "; ".join(f"{p}: {e}" for p, e in refused))
    assert len(acted) > len(refused)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_plans_or_is_refused_in_one_line_on_both_kinds(setting, path, shapes_dir):
    """Each config file (its smoke variant where it has one) on both kinds of the same image folder."""
    spec = f"{path}:smoke" if "smoke" in path.read_text() else str(path)
    if path.stem in ("paper", "sweep_beta", "sweep_regions", "study"):
        spec = f"{path}:digits,smoke"
    for kind in KINDS.values():
        args = [
            f"--config={spec}",
            f"--workdir={setting['tmp'] / 'never_written'}",
            f"--config.data.source=folder:{shapes_dir}",
            f"--config.data.pipeline={kind}",
            "--plan",
        ]
        proc = run_main(args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 0 or (proc.returncode == 2 and len(errors) == 1), (
            path.stem,
            kind,
            proc.stderr[-2000:],
        )
    assert not os.path.exists(setting["tmp"] / "never_written")
