"""A paper study's report: the DeBKD paper's numbers (`paper_tables`) beside the study's own, as one JSON
object holding everything it shows (`paper_study`), and its Markdown, made from that JSON alone."""

from __future__ import annotations

import math
import os

from debkd_jax import metrics, workdir_lib
from debkd_jax.errors import UserError
from debkd_jax.report import files
from debkd_jax.report.markdown import markdown_table, stat_cell, verdict
from debkd_jax.report.paper_tables import (
    DATASET_NAMES,
    KI_PAIRS,
    PAPER,
    PAPER_NOTES,
    STUDENT_SUFFIX,
    TABLE1,
    TABLE1_METRICS,
    TABLE3,
    claims,
)


def paired(results: dict | None, method: str, reference: str) -> dict | None:
    """`method - reference` in test accuracy, seed by seed: the results' `paired` entry, else
    `metrics.paired_difference` of the per-seed accuracies; None without both or on other seeds."""
    if not results or method not in results["methods"] or reference not in results["methods"]:
        return None
    given = results.get("paired", {}).get(reference, {}).get(method)
    if given is not None:
        return given
    a, b = results["methods"][method], results["methods"][reference]
    if a["seeds"] != b["seeds"]:
        return None
    return metrics.paired_difference(
        [s["accuracy"] for s in a["per_seed"]], [s["accuracy"] for s in b["per_seed"]]
    )


def paper_study(
    *, results: dict | None, dataset: str, student: str, setup: dict, seeds_planned, run: dict
) -> dict:
    """The study's report as one JSON object: the paper's rows beside ours (Table 1, Table 3), its claimed
    differences beside our paired ones, the setup, the run (budget, steps, commands, devices) and the job's
    whole results (None while no seed has finished). `paper_study_markdown` reads nothing else."""
    methods = (results or {}).get("methods", {})
    t1 = TABLE1.get(dataset)
    teacher = (results or {}).get("teacher") or {}
    table1 = [
        dict(
            row="Teacher",
            method="teacher",
            paper=_metrics(t1["teacher"]) if t1 else None,
            ours=teacher.get("test"),
        )
    ]
    for name in ("KD", "FKD", "DeBKD"):
        table1.append(
            dict(
                row=f"{name}-{STUDENT_SUFFIX.get(student, student)}",
                method=name,
                paper=_metrics(t1[student][name]) if t1 and student in t1 else None,
                ours=methods[name]["test"] if name in methods else None,
            )
        )
    table3 = []
    for name, without, with_ki in KI_PAIRS:
        t3 = TABLE3[dataset][name] if dataset in TABLE3 and student == "resnet8" else None
        for ki, ours in ((False, without), (True, with_ki)):
            table3.append(
                dict(
                    method=name,
                    ki=ki,
                    ours_method=ours,
                    paper=t3[int(ki)] if t3 else None,
                    paper_delta=t3[2] if t3 and ki else None,
                    ours=methods[ours]["test"]["accuracy"] if ours in methods else None,
                    ours_delta=paired(results, with_ki, without) if ki else None,
                )
            )
    listed = {m for _, without, with_ki in KI_PAIRS for m in (without, with_ki)}
    others = [
        dict(
            method=m,
            ours=methods[m]["test"]["accuracy"],
            vs={ref: paired(results, m, ref) for ref in ("KD", "CE") if ref != m},
        )
        for m in methods
        if m not in listed
    ]
    return {
        "report": "paper_study",
        "paper": PAPER,
        "dataset": dataset,
        "dataset_name": DATASET_NAMES.get(dataset, dataset),
        "student": student,
        "scale": paper_scale(setup, dataset, student),
        "setup": setup,
        "seeds": {"planned": list(seeds_planned), "finished": finished_seeds(results)},
        "teacher": {k: teacher.get(k) for k in ("model", "test", "accuracy", "wall_seconds")},
        "table1": table1,
        "table3": table3,
        "claims": [
            {**c, "ours": paired(results, c["method"], c["reference"])} for c in claims(dataset, student)
        ],
        "others": others,
        "paper_notes": list(PAPER_NOTES.get(dataset, ())),
        "run": run,
        "results": results,
    }


def _metrics(values) -> dict:
    return dict(zip(TABLE1_METRICS, values, strict=True))


def finished_seeds(results: dict | None) -> list:
    """The seeds every method of the results has finished."""
    if not results or not results["methods"]:
        return []
    return sorted(set.intersection(*(set(r["seeds"]) for r in results["methods"].values())))


def paper_scale(setup: dict, dataset: str, student: str) -> dict:
    """Whether the setup is the paper's scale, and each way it is not."""
    t, s, d = setup.get("teacher", {}), setup.get("student", {}), setup.get("data", {})
    off = [] if dataset in TABLE1 else [f"data {dataset!r} is none of the paper's datasets"]
    if d.get("max_per_class"):
        off.append(f"{d['max_per_class']} images per class, not all")
    if t.get("model") != "resnet50":
        off.append(f"teacher {t.get('model')}, not resnet50")
    if s.get("model") != student:
        off.append(f"students {s.get('model')}, not {student}")
    off += [
        f"{part} {c.get('num_epochs')} epochs, not 100"
        for part, c in (("teacher", t), ("students", s))
        if c.get("num_epochs") != 100
    ]
    return {"paper_scale": not off, "differences": off}


def setup_differences(study: dict) -> list[str]:
    """What differs from the paper's setup, as far as can be known (it gives no optimizer or schedule)."""
    su, t = study["setup"], study["teacher"]
    s, te, d = su.get("student", {}), su.get("teacher", {}), su.get("data", {})
    out = [
        "Training: the paper gives no optimizer, learning rate, schedule, batch size or weight decay. Ours: "
        f"SGD (Nesterov momentum {s.get('momentum')}), weight decay {s.get('weight_decay')}, batch "
        f"{s.get('batch_size')} (teacher {te.get('batch_size')}), peak learning rate "
        f"{s.get('learning_rate')} (teacher {te.get('learning_rate')}), {s.get('warmup_epochs')} warm-up "
        f"epochs then {s.get('lr_schedule')} decay, {s.get('num_epochs')} epochs (teacher "
        f"{te.get('num_epochs')}), compute in {su.get('dtype')}, augmentation "
        f"{'on' if d.get('augment') else 'off'} (the paper lists only resizing and normalization)."
    ]
    paper_t = (study["table1"][0]["paper"] or {}).get("accuracy")
    if t.get("test"):
        line = f"Teacher: ours ({t['model']}) {_pct(t['test']['accuracy'])}% on test"
        line += f", the paper's {paper_t:.2f}%" if paper_t is not None else ""
        train = (t.get("accuracy") or {}).get("train")
        if train is not None:
            line += (
                f"; ours is right on {_pct(train)}% of its own training images, so knowledge "
                f"infusion changes the targets of {_pct(1 - train)}% of them (the paper gives no "
                "teacher training accuracy)"
            )
        out.append(line + ".")
    return out + [
        "Students: the paper does not define its 8-layer network; ours is the CIFAR ResNet-8 (3x3 stem of "
        "16, three stages of one BasicBlock, 16/32/64 channels); ResNet-18/50 are CIFAR-style (3x3 stem, no "
        "max-pool).",
        "Methods: KD alpha 0.9, T 4; DeBKD n = 12, beta 0.2, T 4 (the paper's); FKD's hints from the "
        "teacher's 1st, 3rd and last residual blocks (the paper's words) through 1x1 conv + BatchNorm "
        "regressors, weight 1 (the paper gives none); docs/method.md.",
        f"Data: `{d.get('source')}`, split 70/10/20 stratified with seed {su.get('seed')}; the paper's "
        "split, its seeds and how it resized the Kaggle images are not given.",
        "Selection: each student's checkpoint of its best validation epoch, tested once; the paper does not "
        "say which checkpoint it reports.",
        "Seeds: the paper averages three trials and gives no standard deviation or interval, so its "
        "differences may lie within seed noise.",
    ]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _pp(x) -> str:
    return "" if x is None else f"{x:+.2f}"


def _ours_pp(d: dict | None) -> tuple[str, str, str]:
    """(mean, 95% interval, seeds won) of a paired difference, in pp."""
    if d is None:
        return "not run", "", ""
    ci = "" if d["ci"] is None else f"{100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}"
    return f"{100 * d['mean']:+.2f}", ci, f"{d['wins']} of {d['n']}"


def _diff_cell(d: dict | None) -> str:
    mean, ci, won = _ours_pp(d)
    return "" if d is None else f"{mean} ({ci or 'no interval'}), {won}"


def claim_sentence(c: dict) -> str:
    """One sentence on a claimed difference beside ours; says so where ours disagrees or loses a seed."""
    name = f"{c['method']} - {c['reference']} ({c['source']})"
    d = c["ours"]
    if d is None:
        return f"{name}: the paper claims {_pp(c['paper_pp'])} pp; not measured here (a method did not run)."
    if d["ci"] is None:
        call = "one seed: no interval, no call"
    elif d["ci"][0] > 0:
        call = "ours agrees: clearly above 0"
    elif d["mean"] > 0:
        call = f"ours points the same way but is not distinguishable from 0 with {d['n']} seeds"
    elif d["ci"][1] < 0:
        call = "ours disagrees: clearly below 0"
    else:
        call = "ours disagrees in direction (not above 0), not distinguishable from 0"
    if d["ci"] is not None:
        where = "inside" if d["ci"][0] <= c["paper_pp"] / 100 <= d["ci"][1] else "outside"
        call += f"; the paper's value lies {where} our interval"
    lost = d["n"] - d["wins"]
    lost_txt = f" {c['method']} did not beat {c['reference']} in {lost} of {d['n']} seeds." if lost else ""
    return (
        f"{name}: the paper claims {_pp(c['paper_pp'])} pp; "
        f"{verdict(c['method'], c['reference'], d)} So {call}.{lost_txt}"
    )


def disagrees(c: dict) -> bool:
    """Ours does not clearly confirm the claim: not above 0 by its interval, or a seed lost."""
    d = c["ours"]
    return d is not None and (d["mean"] <= 0 or d["wins"] < d["n"] or d["ci"] is None or d["ci"][0] <= 0)


def _table1_md(study: dict) -> list[str]:
    def ours(stat, m):
        return stat_cell(stat[m]) if stat and m in stat else ""

    def paper(p, m):
        return f"{p[m]:.2f}" if p else "—"

    suffix = STUDENT_SUFFIX.get(study["student"], study["student"])
    rows = [
        [r["row"], *(c for m in TABLE1_METRICS for c in (paper(r["paper"], m), ours(r["ours"], m)))]
        for r in study["table1"]
    ]
    header = ["Table 1", *(f"{side} {m}" for m in TABLE1_METRICS for side in ("paper", "ours"))]
    return [
        "",
        f"## Table 1: teacher, KD-{suffix}, FKD-{suffix}, DeBKD-{suffix}",
        "",
        markdown_table(header, rows),
    ]


def _table3_md(study: dict) -> list[str]:
    rows = []
    for r in study["table3"]:
        rows.append(
            [
                r["method"],
                "✓" if r["ki"] else "×",
                r["ours_method"],
                "—" if r["paper"] is None else f"{r['paper']:.2f}",
                _pp(r["paper_delta"]),
                "" if r["ours"] is None else stat_cell(r["ours"]),
                *(_ours_pp(r["ours_delta"]) if r["ki"] else ("", "", "")),
            ]
        )
    header = [
        "Table 3",
        "KI",
        "ours is",
        "paper acc.",
        "paper Δ",
        "ours acc.",
        "ours Δ (pp)",
        "95% CI",
        "won",
    ]
    lines = ["", "## Table 3: each method without and with knowledge infusion", ""]
    if study["student"] != "resnet8":
        lines += ["The paper's Table 3 is for ResNet-8 students only: no paper column here.", ""]
    return lines + [markdown_table(header, rows)]


def _claims_md(study: dict) -> list[str]:
    lines = ["", "## The paper's claimed differences beside ours", ""]
    if not study["claims"]:
        return lines + ["The paper has no numbers for this data."]
    rows = [
        [
            f"{c['method']} - {c['reference']}",
            c["source"],
            _pp(c["paper_pp"]),
            _pp(c["tables_pp"]),
            *_ours_pp(c["ours"]),
        ]
        for c in study["claims"]
    ]
    header = ["difference", "where", "paper (pp)", "its tables give", "ours (pp)", "95% CI", "seeds won"]
    return lines + [markdown_table(header, rows), ""] + [f"- {claim_sentence(c)}" for c in study["claims"]]


def _setup_md(study: dict) -> list[str]:
    off = [c for c in study["claims"] if disagrees(c)]
    lead = (
        (
            f"Ours disagrees with, or does not clearly confirm, {len(off)} of {len(study['claims'])} claimed "
            "differences. What differs in the setup, as far as can be known:"
        )
        if off
        else ("What differs in the setup, as far as can be known:")
    )
    lines = ["", "## What differs from the paper's setup", "", lead, ""]
    lines += [f"- {line}" for line in setup_differences(study)]
    if study["paper_notes"]:
        lines += ["", "Where the paper disagrees with itself for this data:", ""]
        lines += [f"- {note}" for note in study["paper_notes"]]
    return lines


def _run_md(run: dict) -> list[str]:
    env = run.get("environment") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    lines = [
        "",
        "## The run",
        "",
        f"Command: `{run.get('command', '?')}`",
        "",
        f"Budget {run.get('seconds', '?')} s (margin {run.get('margin', '?')} s), used "
        f"{run.get('elapsed', math.nan):.0f} s. Devices: {env.get('devices', '?')}; {versions}.",
        "",
    ]
    if env.get("nvidia_smi"):
        lines += ["nvidia-smi: " + env["nvidia_smi"].replace("\n", "; "), ""]
    rows = [
        [
            str(s["seeds"]),
            s["trains"],
            f"{s['seconds']:.0f}",
            str(s["returncode"]),
            "yes" if s["timed_out"] else "",
            str(s["new_students"]),
            "`" + " ".join(s["command"]) + "`",
        ]
        for s in run.get("steps", [])
    ]
    header = [
        "--config.seeds",
        "trains",
        "seconds",
        "exit",
        "stopped at deadline",
        "students done",
        "command",
    ]
    return lines + [markdown_table(header, rows)]


def paper_study_markdown(study: dict) -> str:
    """The study's report (Markdown), from its JSON alone."""
    seeds, run, t = study["seeds"], study["run"], study["teacher"]
    lines = [
        f"# The DeBKD paper's Table 1 and Table 3 beside ours: {study['dataset_name']}, "
        f"{study['student']} students",
        "",
        f"Paper: {study['paper']}.",
        "",
    ]
    if study["scale"]["paper_scale"]:
        lines.append("Scale: the paper's (all images, ResNet-50 teacher, 100 epochs for it and students).")
    else:
        lines.append(
            "**Not the paper's scale** (" + "; ".join(study["scale"]["differences"]) + "): these "
            "numbers test the command; they are no evidence about the paper's claims."
        )
    done = ", ".join(map(str, seeds["finished"])) or "none"
    lines += [
        "",
        f"Seeds finished: {len(seeds['finished'])} of {len(seeds['planned'])} ({done}). Stopped "
        f"by {run.get('stopped', '?')}. Test metrics in %, mean ± std over the finished seeds, each "
        "student's checkpoint chosen on validation; differences are paired by seed (same "
        "initialization and data order), in percentage points, with a 95% Student-t interval over "
        "seeds.",
        "",
    ]
    if t.get("test"):
        train = (t.get("accuracy") or {}).get("train")
        shown = "not recorded" if train is None else f"{_pct(train)}%"
        lines.append(
            f"Teacher {t['model']}: test {_pct(t['test']['accuracy'])}%; right on {shown} of its "
            "own training images (DeBKD's knowledge infusion replaces its mistakes there)."
        )
    else:
        lines.append("No seed finished: no teacher row and no student numbers yet (the run is below).")
    lines += _table1_md(study) + _table3_md(study) + _claims_md(study)
    if study["others"]:
        rows = [
            [o["method"], stat_cell(o["ours"]), *(_diff_cell(o["vs"].get(r)) for r in ("KD", "CE"))]
            for o in study["others"]
        ]
        lines += [
            "",
            "## Not in the paper",
            "",
            markdown_table(["method", "ours acc.", "- KD (pp, 95% CI), won", "- CE (pp, 95% CI), won"], rows),
        ]
    return "\n".join(lines + _setup_md(study) + _run_md(run)) + "\n"


def write_paper_study(out_dir: str, study: dict, basename: str = "paper_study") -> list[str]:
    """`<basename>.json` and `.md` in `out_dir` through the one report writer (an older, different report
    there is kept aside). Returns the paths."""
    files.write_report(out_dir, basename, study, paper_study_markdown(study), {})
    return [os.path.join(out_dir, f"{basename}.{ext}") for ext in ("json", "md")]


def render_paper_study(json_path: str) -> str:
    """Rewrites the Markdown beside a study's JSON from that file alone; returns its path."""
    study = workdir_lib.read_json(json_path)
    if not isinstance(study, dict) or study.get("report") != "paper_study":
        raise UserError(f"{json_path} is not a paper study's JSON (python -m results.paper.run_study).")
    md_path = os.path.splitext(json_path)[0] + ".md"
    workdir_lib.atomic_write_bytes(md_path, paper_study_markdown(study).encode())
    return md_path
