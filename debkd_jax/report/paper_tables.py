"""The DeBKD paper's numbers as data: its Table 1 and Table 3, the gains its text states, where it disagrees
with itself, and the differences it claims (`claims`), each with the value its own tables give.

The paper: Y. Li, T.-K. Tian, M.-Y. Zhuang, Y.-T. Sun, "De-biased knowledge distillation framework based on
knowledge infusion and label de-biasing techniques", J. Electron. Sci. Technol. 22(3), 100278 (2024),
doi:10.1016/j.jnlest.2024.100278. Table 1: test accuracy, precision and recall (%) of a ResNet-50 teacher
and ResNet-18 / ResNet-8 students (32x32 images, 70/10/20 split, three trials averaged). Table 3: ResNet-8
students of each method without and with knowledge infusion (accuracy %, and the change Δ as printed).
"""

from __future__ import annotations

PAPER = (
    "Li, Tian, Zhuang, Sun 2024, De-biased knowledge distillation framework based on knowledge infusion and "
    "label de-biasing techniques, J. Electron. Sci. Technol. 22(3) 100278, doi:10.1016/j.jnlest.2024.100278"
)
DATASET_NAMES = {
    "dogs_vs_cats": "Dogs vs Cats",
    "chihuahua_muffin": "Chihuahua vs Muffin",
    "car_bike": "Car vs Bike",
}
STUDENT_SUFFIX = {"resnet18": "18", "resnet8": "8"}
TABLE1_METRICS = ("accuracy", "precision", "recall")

# fmt: off
# Table 1, (accuracy, precision, recall) in %: per dataset the teacher, then per student KD, FKD and DeBKD.
TABLE1 = {
    "dogs_vs_cats": dict(
        teacher=(84.98, 84.22, 84.22),
        resnet18=dict(KD=(82.64, 82.64, 83.33), FKD=(82.98, 82.88, 83.05), DeBKD=(83.12, 83.58, 83.12)),
        resnet8=dict(KD=(79.54, 80.09, 79.54), FKD=(79.44, 79.47, 79.36), DeBKD=(80.80, 80.81, 80.80))),
    "chihuahua_muffin": dict(
        teacher=(90.03, 90.13, 90.38),
        resnet18=dict(KD=(88.09, 89.58, 97.32), FKD=(88.74, 89.94, 87.67), DeBKD=(89.78, 89.85, 89.57)),
        resnet8=dict(KD=(83.78, 84.68, 83.07), FKD=(86.42, 86.56, 86.36), DeBKD=(86.73, 87.48, 86.15))),
    "car_bike": dict(
        teacher=(93.23, 93.40, 93.26),
        resnet18=dict(KD=(91.32, 90.84, 91.35), FKD=(91.79, 91.87, 91.65), DeBKD=(93.34, 93.85, 93.31)),
        resnet8=dict(KD=(82.94, 86.93, 82.77), FKD=(84.21, 84.33, 84.13), DeBKD=(89.06, 90.23, 88.97))),
}
# Table 3 (ResNet-8), per method: accuracy % without KI, with KI, and the Δ column as printed.
TABLE3 = {
    "dogs_vs_cats": dict(KD=(79.54, 79.86, 0.32), FKD=(79.44, 79.97, 0.53), DeBKD=(79.64, 80.80, 1.16)),
    "chihuahua_muffin": dict(KD=(83.78, 84.64, 0.86), FKD=(86.42, 86.77, 0.35), DeBKD=(86.73, 87.75, 1.44)),
    "car_bike": dict(KD=(82.94, 83.61, 0.67), FKD=(84.21, 85.02, 0.81), DeBKD=(87.11, 89.06, 1.95)),
}
# Section 4.3's stated gains of DeBKD over KD and over FKD (pp), per student, in TABLE1's dataset order.
STATED_GAINS = {
    ("KD", "resnet18"): (0.48, 1.69, 2.02), ("KD", "resnet8"): (1.26, 2.95, 6.12),
    ("FKD", "resnet18"): (0.14, 0.96, 1.55), ("FKD", "resnet8"): (1.36, 0.31, 3.85),
}
# fmt: on
# Table 3's rows as this package's methods: (the paper's name, without KI, with KI).
KI_PAIRS = (("KD", "KD", "KD+KI"), ("FKD", "FKD", "FKD+KI"), ("DeBKD", "DeBKD-noKI", "DeBKD"))
# Where the paper disagrees with itself (its tables against each other and its text), per dataset.
PAPER_NOTES = {
    "chihuahua_muffin": (
        "Table 3 gives DeBKD without KI 86.73 (Table 1's DeBKD-8, which has KI) and with KI 87.75, and its Δ "
        "+1.44 is not 87.75 - 86.73 = +1.02.",
        "Section 4.3 gives DeBKD-18 - FKD-18 = +0.96; Table 1 gives 89.78 - 88.74 = +1.04.",
        "Table 2's n = 12 row (the default) gives DeBKD-8 84.38, Table 1 86.73.",
        "Table 1's KD-18 recall 97.32 is far from its accuracy 88.09 and precision 89.58.",
    ),
    "car_bike": (
        "Section 4.3 gives DeBKD-8 - FKD-8 = +3.85; Table 1 gives 89.06 - 84.21 = +4.85.",
        "Table 2's n = 12 row gives DeBKD-18 93.36, Table 1 93.34.",
    ),
}


def claims(dataset: str, student: str) -> list[dict]:
    """The differences the paper claims for one dataset and student, each with the value its own tables
    give: DeBKD over KD and over FKD (section 4.3) and, for ResNet-8, knowledge infusion's Δ (Table 3)."""
    if dataset not in TABLE1:
        return []
    i, t1, out = list(TABLE1).index(dataset), TABLE1[dataset][student], []
    for ref in ("KD", "FKD"):
        gain = round(t1["DeBKD"][0] - t1[ref][0], 2)
        out.append(
            dict(
                method="DeBKD",
                reference=ref,
                source="Table 1, section 4.3",
                paper_pp=STATED_GAINS[(ref, student)][i],
                tables_pp=gain,
            )
        )
    if student == "resnet8":
        for name, without, with_ki in KI_PAIRS:
            off, on, delta = TABLE3[dataset][name]
            out.append(
                dict(
                    method=with_ki,
                    reference=without,
                    source="Table 3",
                    paper_pp=delta,
                    tables_pp=round(on - off, 2),
                )
            )
    return out
