"""The paper-scale study's one command (`python -m results.paper.run_study`, docs/paper.md) tested on the CPU:
`configs/paper.py:...,gpu` and its `smoke` shrink, the paper's numbers as data, the report from its JSON
alone, and the command itself on `dogs_vs_cats,resnet8,gpu,smoke` (the GPU's flags on tiny models and data):
the teacher, then seed after seed inside a time budget, stopping after whole seeds, killed at its deadline."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from debkd_jax import config_lib, metrics, processes
from debkd_jax.report import paper, paper_tables

CONFIG = REPO_ROOT / "configs" / "paper.py"
SMOKE = "dogs_vs_cats,resnet8,gpu,smoke"
STUDY_METHODS = ["CE", "KD", "KD+KI", "FKD", "FKD+KI", "DeBKD", "DeBKD-noKI", "DKD"]


def study_command(*args, timeout=300) -> subprocess.CompletedProcess:
    return processes.run(
        [sys.executable, "-m", "results.paper.run_study", *args], cwd=REPO_ROOT, timeout=timeout
    )


@pytest.mark.parametrize("student", ["resnet8", "resnet18"])
def test_the_gpu_preset_is_the_papers_setup_at_a_batch_that_keeps_a_gpu_busy(student):
    config = config_lib.load_config(f"{CONFIG}:dogs_vs_cats,{student},gpu")
    config_lib.validate_config(config)
    assert config.data.source == "folder:../shared/data/dogs_vs_cats_32" and config.data.max_per_class == 0
    assert not config.data.augment and config.dtype == "bfloat16" and config.seeds == 3
    assert (config.teacher.model, config.student.model) == ("resnet50", student)
    assert sorted(config.methods) == sorted(STUDY_METHODS)
    for part in (config.teacher, config.student):
        assert (part.num_epochs, part.batch_size, part.learning_rate) == (100, 512, 0.05 * 512 / 64)
        assert part.warmup_epochs == 5 and part.momentum == 0.9 and part.weight_decay == 5e-4
    smoke = config_lib.load_config(f"{CONFIG}:{SMOKE}")
    config_lib.validate_config(smoke)
    assert (smoke.dtype, smoke.seeds, sorted(smoke.methods)) == ("bfloat16", 3, sorted(STUDY_METHODS))
    assert smoke.student.model == smoke.teacher.model == "resnet_tiny" and smoke.data.max_per_class == 60
    # The variants without `gpu` are as they were (tests/test_methods.py checks them further).
    plain = config_lib.load_config(f"{CONFIG}:dogs_vs_cats,{student}")
    assert plain.dtype == "float32" and plain.student.batch_size == 64 and len(plain.methods) == 6
    with pytest.raises(ValueError, match="gpu"):
        config_lib.load_config(f"{CONFIG}:dogs_vs_cats,tpu")


def test_the_config_loads_without_jax_and_the_command_gives_its_help():
    code = (
        "import sys\nfrom debkd_jax import config_lib\n"
        f"config_lib.load_config({str(CONFIG)!r} + ':dogs_vs_cats,resnet8,gpu')\n"
        "assert 'jax' not in sys.modules, 'configs/paper.py imported JAX'\n"
    )
    done = processes.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    done = study_command("--help", timeout=120)
    assert done.returncode == 0 and "--seconds" in done.stdout
    done = study_command("--out=unused", "--seconds=9", "--seeds=0", timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith("give at least 1 seed.")


def test_the_papers_numbers_agree_with_its_own_text_where_it_does():
    """Table 1's rows against section 4.3's stated gains and Table 3's KD/FKD rows against Table 1's; where
    the paper disagrees with itself, PAPER_NOTES says so."""
    known = {
        ("chihuahua_muffin", "resnet18", "DeBKD", "FKD"),
        ("car_bike", "resnet8", "DeBKD", "FKD"),
        ("chihuahua_muffin", "resnet8", "DeBKD", "DeBKD-noKI"),
    }
    for dataset in paper_tables.TABLE1:
        for student in ("resnet18", "resnet8"):
            for c in paper_tables.claims(dataset, student):
                key = (dataset, student, c["method"], c["reference"])
                assert (abs(c["paper_pp"] - c["tables_pp"]) < 0.005) != (key in known), (key, c)
        t1, t3 = paper_tables.TABLE1[dataset]["resnet8"], paper_tables.TABLE3[dataset]
        assert (t3["KD"][0], t3["FKD"][0]) == (t1["KD"][0], t1["FKD"][0])
        assert (t3["DeBKD"][1] == t1["DeBKD"][0]) == (dataset != "chihuahua_muffin")
    assert paper_tables.claims("dogs_vs_cats", "resnet8")[0]["paper_pp"] == 1.26
    assert paper_tables.claims("dogs_vs_cats", "resnet18")[0]["paper_pp"] == 0.48
    assert all(paper_tables.PAPER_NOTES.get(d) for d in ("chihuahua_muffin", "car_bike"))


def fake_results(accuracies: dict[str, list[float]]) -> dict:
    """A results.json of the main job with these per-seed test accuracies (its `paired` entries as
    report.paired_differences writes them)."""
    from debkd_jax import report

    rows = {
        m: {
            "model": "resnet8",
            "seeds": list(range(len(a))),
            "per_seed": [{"accuracy": x} for x in a],
            "test": metrics.mean_std([{"accuracy": x} for x in a]),
            "config": {},
        }
        for m, a in accuracies.items()
    }
    return {
        "teacher": {"model": "resnet50", "test": {"accuracy": 0.85}, "accuracy": {"train": 0.97}},
        "methods": rows,
        "paired": report.paired_differences(rows),
    }


def test_the_report_says_where_ours_disagrees_and_renders_from_its_json_alone(tmp_path):
    acc = {
        "CE": [0.70, 0.71, 0.72],
        "KD": [0.80, 0.81, 0.82],
        "KD+KI": [0.805, 0.815, 0.825],
        "FKD": [0.79, 0.80, 0.81],
        "FKD+KI": [0.79, 0.80, 0.81],
        "DeBKD": [0.79, 0.815, 0.81],
        "DeBKD-noKI": [0.78, 0.79, 0.80],
        "DKD": [0.82, 0.83, 0.84],
    }
    setup = {
        "teacher": {"model": "resnet50", "num_epochs": 100, "batch_size": 512},
        "student": {"model": "resnet8", "num_epochs": 100, "batch_size": 512, "learning_rate": 0.4},
        "dtype": "bfloat16",
        "seed": 0,
        "data": {"source": "folder:x", "max_per_class": 0},
    }
    run = {
        "command": "python -m results.paper.run_study --out=X --seconds=540",
        "seconds": 540,
        "margin": 30,
        "elapsed": 500.0,
        "stopped": "all 3 seeds finished",
        "steps": [],
        "environment": {},
    }
    study = paper.paper_study(
        results=fake_results(acc),
        dataset="dogs_vs_cats",
        student="resnet8",
        setup=setup,
        seeds_planned=[0, 1, 2],
        run=run,
    )
    assert study["scale"] == {"paper_scale": True, "differences": []}
    claims = {(c["method"], c["reference"]): c for c in study["claims"]}
    assert claims[("DeBKD", "KD")]["ours"] == study["results"]["paired"]["KD"]["DeBKD"]
    debkd_fkd = metrics.paired_difference(acc["DeBKD"], acc["FKD"])  # not in `paired`: computed the same way
    assert claims[("DeBKD", "FKD")]["ours"] == debkd_fkd
    assert claims[("DeBKD", "DeBKD-noKI")]["ours"]["mean"] == pytest.approx(0.015)
    md = paper.paper_study_markdown(study)
    assert "| KD-8 | 79.54 | 81.00 ± 0.82 |" in md and "| Teacher | 84.98 | 85.00 |" in md
    assert "| DeBKD - KD | Table 1, section 4.3 | +1.26 | +1.26 | -0.50 |" in md
    assert "DeBKD did not beat KD in 2 of 3 seeds" in md and "ours disagrees in direction" in md
    assert "right on 97.00% of its own training images" in md and "Seeds finished: 3 of 3" in md
    assert "What differs in the setup" in md and "batch 512" in md and "Not the paper's scale" not in md
    written = paper.write_paper_study(str(tmp_path), study)
    assert [os.path.basename(p) for p in written] == ["paper_study.json", "paper_study.md"]
    (tmp_path / "paper_study.md").unlink()
    done = study_command(f"--render={tmp_path}", timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "paper_study.md").read_text() == md


def test_the_records_of_a_workdir_outside_out_travel_without_checkpoints(tmp_path):
    """With --workdir outside OUT (a device's $OUT takes 8 files), OUT gets its records as one .tar.gz."""
    import io
    import tarfile

    from results.paper import run_study

    for name in (
        "results.json",
        "splits.csv",
        "teacher/logits.npz",
        "teacher/teacher.json",
        "teacher/checkpoints/3/_METADATA",
        "teacher/final/manifest.ocdbt",
        "students/KD-seed0/result.json",
        "students/KD-seed0/metrics.jsonl",
        "students/KD-seed0/checkpoints/2/meta.json",
        "students/KD-seed0/tensorboard/events.out.tfevents.1",
    ):
        (tmp_path / "w" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "w" / name).write_text("{}")
    with tarfile.open(fileobj=io.BytesIO(run_study.records(str(tmp_path / "w")))) as tar:
        assert sorted(tar.getnames()) == [
            "run/results.json",
            "run/splits.csv",
            "run/students/KD-seed0/metrics.jsonl",
            "run/students/KD-seed0/result.json",
            "run/teacher/logits.npz",
            "run/teacher/teacher.json",
        ]


def read_study(out) -> dict:
    return json.loads((out / "paper_study.json").read_text())


def student_results(workdir) -> list[str]:
    return sorted(p.parent.name for p in (workdir / "students").glob("*/result.json"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_deadline_kills_a_step_and_the_report_still_comes(tmp_path, dogs_vs_cats_dir):
    """8 s cannot fit the teacher and a seed (18 s or more): the step is killed at the deadline (its whole
    group: the module's fixture checks that nothing is left), and the report says no seed finished."""
    out = tmp_path / "out"
    done = study_command(f"--out={out}", "--seconds=8", "--margin=1", f"--variant={SMOKE}")
    assert done.returncode == 0, done.stdout + done.stderr
    study = read_study(out)
    assert study["seeds"] == {"planned": [0, 1, 2], "finished": []}
    (step,) = study["run"]["steps"]
    assert step["timed_out"] and step["returncode"] is None and step["seconds"] < 8
    assert study["run"]["stopped"].startswith("the deadline") and study["teacher"]["test"] is None
    md = (out / "paper_study.md").read_text()
    assert "Seeds finished: 0 of 3 (none)" in md and "No seed finished" in md and "| KD-8 | 79.54 |" in md


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_study_runs_seed_by_seed_inside_its_budget(tmp_path, dogs_vs_cats_dir):
    out = tmp_path / "out"
    workdir = out / "run"
    # Two seeds planned of the variant's three: seed 1 is the resumed one.
    args = [f"--out={out}", f"--variant={SMOKE}", f"--data={dogs_vs_cats_dir}", "--margin=5", "--seeds=2"]
    # A budget that fits one seed: with --safety=100, seed 1 would "take" 100 times seed 0's time (this test
    # takes about 40 s on 2 quiet cores, twice that beside a running suite).
    done = study_command(*args, "--seconds=400", "--safety=100", timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    study = read_study(out)
    assert (workdir / "teacher" / "teacher.json").exists() and study["teacher"]["model"] == "resnet_tiny"
    assert study["seeds"]["finished"] == [0]
    assert "Seeds finished: 1 of 2 (0)" in (out / "paper_study.md").read_text()
    assert student_results(workdir) == sorted(f"{m}-seed0" for m in STUDY_METHODS)
    assert study["run"]["stopped"].startswith("the budget: seed 1 would take")
    (step,) = study["run"]["steps"]
    assert (step["trains"], step["returncode"], step["new_students"]) == ("the teacher and seed 0", 0, 8)
    assert step["command"][-3:-1] == ["--config.seeds=1", "--config.progress=False"]
    assert f"--config.data.source=folder:{dogs_vs_cats_dir}" in step["command"]
    assert 0 < step["seed_seconds"] < step["seconds"]  # the teacher's time is not the next seed's
    assert study["teacher"]["accuracy"]["train"] is not None and study["results"]["paired"]["KD"]
    assert study["results"]["dataset"]["sizes"]["train"] == 84 and not study["scale"]["paper_scale"]
    files = sorted(os.listdir(out))
    assert files == [
        "commands.txt",
        "environment.txt",
        "log.txt",
        "paper_study.json",
        "paper_study.md",
        "run",
    ]
    assert study["run"]["environment"]["backend"] == "cpu" and study["run"]["environment"]["devices"]
    commands = (out / "commands.txt").read_text()
    assert "python -m results.paper.run_study --out=" in commands and "--config.seeds=1" in commands
    assert "step 1: exit 0" in (out / "log.txt").read_text()
    # Paths are recorded as they were given: the only absolute ones are the test's own --out and --data.
    given = (str(tmp_path), str(dogs_vs_cats_dir))
    machine_path = re.compile(r"(?<![\w.~])/(?:work|tmp|home|root|Users|mnt|data|scratch)/[^\s\"'`,)|]*")
    for name in ("paper_study.json", "paper_study.md", "commands.txt"):
        other = [p for p in machine_path.findall((out / name).read_text()) if not p.startswith(given)]
        assert not other, (name, other[:3])

    # The same command again, with time for the rest: seed 0 is not run again, seed 1 runs.
    done = study_command(*args, "--seconds=400", timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    study = read_study(out)
    assert study["seeds"]["finished"] == [0, 1] and study["run"]["stopped"] == "all 2 seeds finished"
    assert [(s["seeds"], s["trains"], s["new_students"]) for s in study["run"]["steps"]] == [
        (1, "the teacher and seed 0", 8),
        (2, "seed 1", 8),
    ]
    assert student_results(workdir) == sorted(f"{m}-seed{s}" for m in STUDY_METHODS for s in range(2))
    assert "not run again" in (out / "log.txt").read_text()
    assert any(
        f.startswith("paper_study.") and f.endswith(".json") and f != "paper_study.json"
        for f in os.listdir(out)
    )  # the 1-seed report, kept aside
    md = (out / "paper_study.md").read_text()
    assert "Seeds finished: 2 of 2 (0, 1)" in md and "| DeBKD-8 | 80.80 |" in md and "+1.26" in md
    assert study["results"]["methods"]["KD"]["seeds"] == [0, 1]

    # The report again, from its JSON alone, elsewhere (as a GPU run's JSON is rendered here).
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copy(out / "paper_study.json", elsewhere)
    done = study_command(f"--render={elsewhere / 'paper_study.json'}", timeout=120)
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "paper_study.md").read_text() == md
