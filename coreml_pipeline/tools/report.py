"""Size against quality of every experiment: a Pareto chart and a table.

    python -m coreml_pipeline.tools.report                 # every experiment of `dvc exp show`
    python -m coreml_pipeline.tools.report --out reports --names sweep-1a2b3c4d sweep-5e6f7a8b
    python -m coreml_pipeline.tools.report --family all      # one chart and table per model family

Reads `dvc exp show --json` (experiments, the workspace and the commit they
branch from), writes `<out>/pareto.png` (package MB against STS-B Spearman and
against mean cosine fidelity, or another model family's headline quality; points numbered by size, Pareto-optimal ones in
red with a key naming the settings that differ from the commit's) and
`<out>/experiments.md`.
One model family at a time (quality means another thing for each, and one
Pareto front over all of them means nothing): the workspace's family by
default, `--family NAME` for another, `--family all` for one chart and table
per family (`<out>/<family>/`).
For a per-experiment comparison in DVC itself: `dvc plots diff <exp> <exp>`
(the `size_vs_*` plots of dvc.yaml, one point per experiment).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coreml_pipeline.tools import experiments

# Settings that name a run, not a recipe: left out of labels.
NOT_RECIPE = ("data.", "evaluate.", "model.source")


def recipe_label(params: dict, reference: dict) -> str:
    """The settings that differ from the reference commit, e.g. `palettize.n_bits=2`."""
    changed = [f"{k}={v}" for k, v in sorted(params.items())
               if reference.get(k) != v and not k.startswith(NOT_RECIPE)]
    # Copies of sections (finetune.palettize.*, coreml.palettize.*) repeat what the section itself says.
    changed = [c for c in changed if not c.startswith(("finetune.palettize.", "finetune.quantize.", "coreml.prune.",
                                                       "coreml.palettize.", "coreml.quantize."))]
    # A mixed-bit (or mixed-dtype) recipe names every layer: count the layers per width instead.
    for key, unit in (("palettize.layer_bits", "-bit"), ("quantize.layer_dtypes", "")):
        widths = [params[k] for k in params if k.startswith(f"{key}.")]
        changed = [c for c in changed if not c.startswith(f"{key}.")]
        if widths:
            counts = ", ".join(f"{b}{unit} {widths.count(b)}" for b in sorted(set(widths), key=str))
            changed.append(f"{key}=({len(widths)} layers: {counts})")
    return " ".join(changed) or "(the commit's config)"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Pareto-optimal when no other point is at most as large and at least as
    good, and strictly better in one (size minimized, quality maximized)."""
    optimal = []
    for i, (size, quality) in enumerate(points):
        dominated = any(s <= size and q >= quality and (s < size or q > quality)
                        for j, (s, q) in enumerate(points) if j != i)
        optimal.append(not dominated)
    return optimal


# The headline quality of each model family's metrics, by the key that carries it (evaluate's "quality").
QUALITY_TITLES = {"sts_spearman": "STS-B Spearman x100", "psnr_db": "output PSNR (dB) against float",
                  "next_token_agreement": "next-token agreement with float",
                  "top1_agreement": "top-1 agreement with float"}


def axes_of(metrics: dict) -> list[tuple[str, str]]:
    """(metric key, title) of the quality axes: STS-B and cosine for the sentence embedder,
    the family's headline quality (plus cosine where it has one) for the others."""
    primary = next((key for key in QUALITY_TITLES if key in metrics), "quality")
    axes = [(primary, QUALITY_TITLES.get(primary, "quality"))]
    if "mean_cosine" in metrics:
        axes.append(("mean_cosine", "mean cosine to the float outputs"))
    return axes


def family_of(row: dict) -> str:
    """model.family of an experiment's params (the schema's default where its params.yaml has none)."""
    from coreml_pipeline.config.schema import ModelConfig

    return row["params"].get("model.family", ModelConfig.family)


def collect(names: list[str] | None = None, cwd: Path = experiments.ROOT,
            all_commits: bool = False) -> tuple[list[dict], str]:
    """Experiment rows with metrics, each distinct result once, labelled against HEAD's params,
    each with its model family; and the workspace's family."""
    rows = experiments.experiments(cwd, all_commits)
    if names:
        known = [row["name"] for row in rows if row["metrics"] is not None and row["kind"] != "workspace"]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise SystemExit(f"report: --names {' '.join(unknown)}: no such experiment with metrics; known: "
                             f"{', '.join(known) or 'none (run `dvc exp run` first)'}"
                             + ("" if all_commits else " (--all-commits: every commit's)"))
    reference = next((r["params"] for r in rows if r["kind"] == "baseline"), {})
    workspace = next((r for r in rows if r["kind"] == "workspace"), None)
    workspace_family = family_of(workspace or {"params": reference})
    seen, chosen = set(), []
    for row in rows:
        if names and row["name"] not in names:
            continue
        if row["metrics"] is None or row["kind"] == "workspace":
            continue  # the workspace repeats the commit or an applied experiment
        row["family"] = family_of(row)
        # The same recipe again (an experiment of the commit's own config, or the
        # same run under several commits: provenance moves the size by a byte or two).
        m = row["metrics"]
        result = (round(m["package_bytes"] / 1e4), *(m.get(key) for key, _ in axes_of(m)))
        recipe = json.dumps(row["params"], sort_keys=True, default=str)
        if row["rev"] in seen or recipe in seen or result in seen:
            continue
        seen.update((row["rev"], recipe, result))
        row["label"] = recipe_label(row["params"], reference)
        chosen.append(row)
    return chosen, workspace_family


def by_size(rows: list[dict]) -> list[dict]:
    """Rows sorted by package size, each numbered (#1 the smallest) for chart and table."""
    ordered = sorted(rows, key=lambda r: r["metrics"]["package_bytes"])
    for number, row in enumerate(ordered, 1):
        row["number"] = number
    return ordered


def table(rows: list[dict]) -> str:
    rows = by_size(rows)
    axes = axes_of(rows[0]["metrics"])
    fronts = [pareto_front([(r["metrics"]["package_bytes"], r["metrics"][key]) for r in rows]) for key, _ in axes]
    lines = ["| # | experiment | recipe (differs from the commit) | size MB | ratio to fp16 | "
             + " | ".join(title for _, title in axes) + " | meets target | "
             + " | ".join(f"Pareto (size, {key})" for key, _ in axes) + " |",
             "|---:|---|---|---:|---:|" + "---:|" * len(axes) + ":---:|" + ":---:|" * len(axes)]
    for index, r in enumerate(rows):
        m = r["metrics"]
        values = " | ".join(f"{m[key]:.4f}" if key != "sts_spearman" else f"{m[key]:.2f}" for key, _ in axes)
        marks = " | ".join("*" if front[index] else "" for front in fronts)
        lines.append(f"| {r['number']} | {r['name']} | {r['label']} | {m['package_bytes'] / 1e6:.2f} "
                     f"| {m['size_ratio']:.3f} | {values} | {'yes' if m.get('meets_target') else 'no'} | {marks} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = by_size(rows)
    float_sts = next((r["metrics"]["float_sts_spearman"] for r in rows if "float_sts_spearman" in r["metrics"]), None)
    float_mb = next((r["metrics"]["float16_package_bytes"] / 1e6 for r in rows
                     if "float16_package_bytes" in r["metrics"]), None)
    sizes = [r["metrics"]["package_bytes"] / 1e6 for r in rows]
    panels = axes_of(rows[0]["metrics"])
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6.2), squeeze=False)
    labelled = set()
    for axis, (key, title) in zip(axes[0], panels):
        quality = [r["metrics"][key] for r in rows]
        optimal = pareto_front(list(zip(sizes, quality)))
        axis.scatter(sizes, quality, c=["tab:red" if o else "tab:gray" for o in optimal], s=30, zorder=3)
        front = sorted((s, q) for s, q, o in zip(sizes, quality, optimal) if o)
        if front:
            axis.step([s for s, _ in front], [q for _, q in front], where="post", color="tab:red", lw=1, zorder=2,
                      label="Pareto front")
        for s, q, o, r in zip(sizes, quality, optimal, rows):
            # Numbers, not labels, on the plot: nearby points would overlap; the key is below.
            axis.annotate(str(r["number"]), (s, q), textcoords="offset points", xytext=(4, 3), fontsize=8,
                          color="tab:red" if o else "dimgray", fontweight="bold" if o else "normal")
            if o:
                labelled.add(r["number"])
        if key == "sts_spearman" and float_sts is not None:
            axis.axhline(float_sts, color="tab:blue", ls="--", lw=1, label=f"float model {float_sts:.2f}")
        if key == "mean_cosine":
            axis.axhline(1.0, color="tab:blue", ls="--", lw=1, label="float model 1.0")
        axis.set_xlabel("package size, MB" + (f" (float16: {float_mb:.1f} MB)" if float_mb else ""))
        axis.set_ylabel(title)
        axis.set_title(f"{title} against size")
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    key_lines = [textwrap.shorten(f"#{r['number']} {r['name']}: {r['label']}", 110) for r in rows
                 if r["number"] in labelled]
    figure.text(0.01, 0.01, "Pareto-optimal (red):\n" + "\n".join(key_lines), fontsize=7.5, va="bottom",
                family="monospace")
    figure.suptitle(f"{len(rows)} experiments: size against quality (full list in experiments.md)", fontsize=11)
    figure.tight_layout(rect=(0, 0.02 + 0.021 * (len(key_lines) + 1), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def by_family(rows: list[dict]) -> dict[str, list[dict]]:
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    return families


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiments.md").write_text(table(rows), encoding="utf-8")
    chart(rows, out / "pareto.png")


def report(out: Path, names: list[str] | None = None, cwd: Path = experiments.ROOT,
           all_commits: bool = False, family: str | None = None) -> dict[str, list[dict]]:
    """Writes the chart and table of one family (``family``; None: the workspace's) to ``out``,
    or of every family to ``out/<family>/`` (``family="all"``). Returns the rows written, by family;
    rows of the families left out are in the result under ``"left out"``."""
    rows, workspace_family = collect(names, cwd, all_commits)
    if not rows:
        raise SystemExit("no experiment with metrics: run `dvc exp run` or `python -m coreml_pipeline.tools.sweep -m ...` first")
    families = by_family(rows)
    if family == "all":
        for name, members in families.items():
            write(members, out / name)
        return families
    family = family or workspace_family
    if family not in families:
        have = ", ".join(f"{name} ({len(members)})" for name, members in sorted(families.items()))
        raise SystemExit(f"report: no experiment of model family {family!r}; experiments by family: {have}; "
                         "choose one with --family NAME, or --family all")
    write(families[family], out)
    left_out = [row for name, members in families.items() if name != family for row in members]
    return {family: families[family], "left out": left_out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="reports", help="folder for pareto.png and experiments.md")
    parser.add_argument("--names", nargs="*", help="only these experiments (default: all)")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    parser.add_argument("--family", help="the model family to report (default: the workspace's); "
                        "all: one chart and table per family, in <out>/<family>/")
    args = parser.parse_args(argv)
    written = report(Path(args.out), args.names, all_commits=args.all_commits, family=args.family)
    left_out = written.pop("left out", [])
    for family, rows in written.items():
        folder = Path(args.out) if args.family != "all" else Path(args.out) / family
        print(f"{family}: {len(rows)} experiments -> {folder}/pareto.png, {folder}/experiments.md")
        print((folder / "experiments.md").read_text(encoding="utf-8"))
    if left_out:
        others = sorted({row["family"] for row in left_out})
        print(f"left out {len(left_out)} experiment(s) of other model families ({', '.join(others)}): "
              f"--family {others[0]} or --family all")


if __name__ == "__main__":
    main()
