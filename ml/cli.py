"""`cmim` command line for the ML library: works with no server running."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="Train undistillable classifiers (CMIM) and audit them.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print their numbers and ratios.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
# Tables fit 100 columns (narrower terminals get their own width).
WIDTH = min(shutil.get_terminal_size((100, 24)).columns, 100)
console = Console(width=WIDTH)
err = Console(stderr=True, width=WIDTH)
R = TypeVar("R")

ParamList = Annotated[list[str] | None, typer.Option(help="key=value (value parsed as JSON), repeatable")]


def fail(message: str) -> None:
    """Print a one-line error and exit 2."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a user's bad input into a one-line message instead of a traceback."""
    try:
        yield
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"{where + ': ' if where else ''}{first['msg']}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e).strip("'\""))


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """['lam=3', 'temperatures=[1,4]'] -> {'lam': 3, 'temperatures': [1, 4]}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r])
    console.print(table)


def run_with_progress(description: str, total: int, work: Callable[[Callable[..., None]], R]) -> R:
    """Run work(update) under a progress bar; update(done, info, total=None) moves it (and may reset
    the total). Without a terminal (logs, CI) it prints a plain line at every 5 % instead."""
    state = {"total": total, "next": 0}
    if not err.is_terminal:

        def log_update(done: int, info: str = "", total: int | None = None) -> None:
            state["total"] = total or state["total"]
            pct = 100 * done // max(state["total"], 1)
            if pct >= state["next"] or done == state["total"]:
                err.print(f"{description}: {done}/{state['total']} {info}", highlight=False)
                state["next"] = pct - pct % 5 + 5

        return work(log_update)
    with progress() as bar:
        task = bar.add_task(description, total=total, info="")

        def bar_update(done: int, info: str = "", total: int | None = None) -> None:
            bar.update(task, completed=done, info=info, total=total or bar.tasks[0].total)

        return work(bar_update)


@app.command()
def datasets() -> None:
    """List the registered data sets."""
    from ml.data import dataset_infos

    rows = [
        [
            i.name,
            "x".join(map(str, i.input_shape)) if i.input_shape else "from file",
            i.num_classes or "from file",
            i.description,
        ]
        for i in dataset_infos()
    ]
    print_table("data sets", ["name", "input", "classes", "description"], rows)


@app.command()
def models() -> None:
    """List the model zoo."""
    from ml.models import model_infos

    print_table(
        "models", ["name", "inputs", "description"], [[m.name, m.kind, m.description] for m in model_infos()]
    )


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="folder for model.safetensors + model.json")] = Path("runs/model"),
    dataset: str = "mnist1d",
    dataset_param: ParamList = None,
    arch: str = "cnn1d",
    objective: str = "cmim",
    param: ParamList = None,
    epochs: int = 60,
    batch_size: int = 128,
    optimizer: str = "adamw",
    lr: Annotated[float | None, typer.Option(help="default 1e-2; 1e-3 when fine-tuning (--init)")] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option(help="linear lr warm-up; default 0, 1 epoch when fine-tuning")
    ] = None,
    weight_decay: float = 1e-2,
    seed: int = 0,
    device: str = "auto",
    augmentation: Annotated[
        str | None, typer.Option(help="none | feature_noise | shift_noise | crop_flip; default: the data's")
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="fine-tune this model.safetensors (its model.json beside it)")
    ] = None,
) -> None:
    """Train a teacher (or fine-tune one with --init) and write its checkpoint."""
    from ml.checkpoint import save_checkpoint
    from ml.train import EpochReport, TrainConfig, fine_tune_defaults, train_model

    with one_line_errors():
        optional = {"lr": lr, "warmup_epochs": warmup_epochs, "augmentation": augmentation}
        cfg = TrainConfig(
            dataset=dataset,
            dataset_params=parse_params(dataset_param),
            arch=arch,
            objective=objective,
            objective_params=parse_params(param),
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
            **{k: v for k, v in optional.items() if v is not None},
        )
        init_meta = None
        if init is not None:
            init_meta = _init_meta(init)
            cfg = fine_tune_defaults(cfg)

        def work(update: Callable[..., None]) -> Any:
            def on_epoch(r: EpochReport) -> None:
                info = (
                    f"loss {sum(r.losses.values()):.3f}  test {r.test_acc:.2f}%  I_1 {r.cmi.get('1', 0):.4f}"
                )
                update(r.epoch, info)

            return train_model(cfg, on_epoch=on_epoch, init_weights=init, init_meta=init_meta)

        result = run_with_progress(f"train {arch}/{objective}", epochs, work)
        weights, config = save_checkpoint(result.model, result.meta, out)
    m = result.meta.metrics
    rows = [
        ["best test acc %", result.best_acc],
        ["last test acc %", result.last_acc],
        ["parameters", m["parameters"]],
    ]
    if "fine_tune" in m:
        rows.insert(0, ["test acc before fine-tuning %", m["fine_tune"]["acc_before"]])
        if m["fine_tune"]["warning"]:
            err.print(f"[yellow]warning:[/yellow] {m['fine_tune']['warning']}", highlight=False)
    rows += [
        [f"I_{t} test / train", f"{m['cmi_test'][t]:.4f} / {m['cmi_train'][t]:.4f}"] for t in m["cmi_test"]
    ]
    print_table(f"{arch} trained with {objective} on {dataset}", ["metric", "value"], rows)
    console.print(f"checkpoint: {weights} + {config.name}")


def _init_meta(weights: Path) -> Any:
    """The config beside an --init checkpoint (None when the weights come alone)."""
    from ml.checkpoint import CONFIG_NAME, load_meta

    if not weights.is_file():
        raise FileNotFoundError(f"--init: no file at {weights}")
    config = weights.with_name(CONFIG_NAME)
    return load_meta(config) if config.is_file() else None


@app.command()
def cmi(
    checkpoint: Annotated[Path, typer.Argument(help="model.safetensors (model.json beside it)")],
    split: str = "test",
    temperature: Annotated[list[float] | None, typer.Option("--temperature", "-t")] = None,
    dataset_param: ParamList = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """I_T per temperature of a checkpoint on its data set's train or test split."""
    from ml.checkpoint import load_checkpoint
    from ml.cmi import split_cmi
    from ml.data import load_dataset

    with one_line_errors():
        if split not in ("train", "test"):
            raise ValueError(f"--split must be train or test, not {split!r}")
        model, meta = load_checkpoint(checkpoint)
        params = meta.train_config.get("dataset_params", {}) | parse_params(dataset_param)
        data = load_dataset(meta.dataset, **params)
        temps = temperature or [0.5, 1, 2, 4, 8, 16, 32]
        x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
        values = split_cmi(model, x, y, temps)
    if as_json:
        console.print_json(json.dumps({"split": split, "cmi": values}))
    else:
        print_table(f"I_T on the {split} split", ["T", "I_T"], [[t, f"{v:.5f}"] for t, v in values.items()])


@bench_app.command("speed")
def bench_speed(
    steps: int = 60,
    rounds: int = 5,
    students: int = 8,
) -> None:
    """CMIM step time / CE step time, and lockstep audit time / sequential; last line is JSON."""
    from ml.speed import speed

    result = speed(steps=steps, rounds=rounds, students=students, log=console.print)
    console.print(json.dumps(result), highlight=False, soft_wrap=True)


@app.command()
def attacks() -> None:
    """List the attack suite with each attack's defaults and paper."""
    from ml.attacks import attack_infos

    rows = [[a.key, a.paper, ",".join(a.views), json.dumps(a.defaults)] for a in attack_infos()]
    print_table("attacks", ["key", "paper", "views", "defaults"], rows)


@app.command()
def presets() -> None:
    """List the job presets (`cmim audit --preset NAME`, or `{"preset": NAME}` in a job)."""
    from ml.presets import PRESETS

    rows = [
        [p.name, p.expected_time, "yes" if p.indicative else "no", p.description] for _, p in PRESETS.items()
    ]
    print_table("presets", ["name", "expected time", "indicative", "description"], rows)


def _train_stage(cfg: Any, label: str, data: Any) -> Any:
    from ml.train import train_model

    def work(update: Callable[..., None]) -> Any:
        return train_model(
            cfg, data, on_epoch=lambda r: update(r.epoch, f"test {r.test_acc:.2f}%"), stage=label
        )

    return run_with_progress(label, cfg.epochs, work).model


@app.command()
def audit(
    ctx: typer.Context,
    preset: Annotated[
        str | None,
        typer.Option(
            help="start from a job preset (`cmim presets`): quick | standard; options given override it"
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="teacher: a checkpoint (.safetensors) or an ONNX model (.onnx); else one is trained"
        ),
    ] = None,
    teacher_output: Annotated[
        str, typer.Option(help="what an ONNX teacher outputs: logits | probabilities")
    ] = "logits",
    control_arch: Annotated[
        str | None,
        typer.Option(help="zoo architecture of the CE control; default the teacher's (required for ONNX)"),
    ] = None,
    augmentation: Annotated[
        str | None, typer.Option(help="none | feature_noise | shift_noise | crop_flip; default: the data's")
    ] = None,
    out: Annotated[Path, typer.Option(help="where the JSON report is written")] = Path("runs/audit.json"),
    dataset: Annotated[str | None, typer.Option(help="default: the teacher's data set, else mnist1d")] = None,
    dataset_param: ParamList = None,
    arch: Annotated[str, typer.Option(help="teacher architecture when training one")] = "cnn1d",
    objective: Annotated[str, typer.Option(help="teacher objective when training one")] = "cmim",
    param: ParamList = None,
    teacher_epochs: Annotated[
        int,
        typer.Option(
            help="epochs of the trained teacher; for an ONNX or a fine-tuned checkpoint teacher, the CE "
            "control's (trained from scratch, as the service trains it for an uploaded model)"
        ),
    ] = 60,
    student: Annotated[list[str] | None, typer.Option(help="student architecture, repeatable")] = None,
    attack: Annotated[list[str] | None, typer.Option(help="attack key, repeatable (default: all)")] = None,
    attack_param: Annotated[list[str] | None, typer.Option(help="key.name=value, repeatable")] = None,
    seeds: int = 5,
    epochs: int = 300,
    batch_size: int = 128,
    lr: float = 1e-2,
    ls_eps: Annotated[list[float] | None, typer.Option(help="LS sweep, repeatable")] = None,
    ls_mixup: bool = True,
    control: bool = True,
    output_mode: Annotated[str, typer.Option(help="probs | topk | label | rounded")] = "label",
    k: int = 5,
    decimals: int = 2,
    compare_raw: bool = False,
    labelled_fraction: float = 1.0,
    budget: Annotated[
        list[int] | None,
        typer.Option(help="query budget for the budget curve, repeatable (default: 1, 5, 25 passes)"),
    ] = None,
    budgets: Annotated[bool, typer.Option(help="run the budget curve at all")] = True,
    transfer: Annotated[str | None, typer.Option(help="unlabelled transfer set (a data set name)")] = None,
    transfer_param: ParamList = None,
    device: str = "auto",
    workers: Annotated[int, typer.Option(min=1, help="seeds trained at once, in separate processes")] = 1,
) -> None:
    """Train (or load) a teacher and a CE control, attack both, and print the verdict."""
    from ml.audit import AuditConfig, run_audit
    from ml.checkpoint import load_checkpoint
    from ml.data import load_dataset
    from ml.oracle import OutputMode
    from ml.train import TrainConfig, check_fits

    with one_line_errors():
        per_attack: dict[str, dict[str, Any]] = {}
        for key, value in parse_params(attack_param).items():
            name, dot, field = key.partition(".")
            if not dot:
                raise ValueError(f"--attack-param takes attack.name=value, got {key!r}")
            per_attack.setdefault(name, {})[field] = value
        from ml.presets import PresetOptions, own_objective

        pre = PresetOptions(ctx, preset, trains_teacher=teacher is None)
        student, attack = (
            pre.pick("student", student, "audit", "students"),
            pre.pick("attack", attack, "audit", "attacks"),
        )
        seeds, epochs = (
            pre.pick("seeds", seeds, "audit", "seeds"),
            pre.pick("epochs", epochs, "audit", "epochs"),
        )
        ls_eps, control = (
            pre.pick("ls_eps", ls_eps, "audit", "ls_eps"),
            pre.pick("control", control, "audit", "control"),
        )
        output_mode = pre.pick("output_mode", output_mode, "audit", "output_mode")
        output_mode = output_mode["kind"] if isinstance(output_mode, dict) else output_mode
        budget = pre.pick("budget", budget, "audit", "query_budgets")
        per_attack = pre.params(per_attack, "audit", "attack_params")
        dataset, arch = (
            pre.pick("dataset", dataset, "teacher", "dataset"),
            pre.pick("arch", arch, "teacher", "arch"),
        )
        objective = pre.pick("objective", objective, "teacher", "objective")
        pre.job["teacher"] = own_objective(pre.job["teacher"], {"objective": objective})
        teacher_epochs = pre.pick("teacher_epochs", teacher_epochs, "teacher", "epochs")
        dataset_params = pre.params(parse_params(dataset_param), "teacher", "dataset_params")
        objective_params = pre.params(parse_params(param), "teacher", "objective_params")
        cfg = AuditConfig(
            students=student or ["mlp"],
            **({"attacks": attack} if attack else {}),
            attack_params=per_attack,
            seeds=seeds,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            **({"ls_eps": ls_eps} if ls_eps else {}),
            ls_mixup=ls_mixup,
            control=control,
            output_mode=OutputMode(kind=output_mode, k=k, decimals=decimals),
            compare_raw=compare_raw,
            labelled_fraction=labelled_fraction,
            query_budgets=budget if budgets else [],
            transfer=transfer,
            transfer_params=parse_params(transfer_param),
            device=device,
        )
        cfg.attack_rows()  # validates attack parameters before any training
        onnx = teacher is not None and teacher.suffix == ".onnx"
        from_scratch = onnx  # the control is not trained by the teacher's own recipe
        if onnx:
            if dataset is None:
                raise ValueError("--teacher model.onnx needs --dataset: the data set the model answers for")
            recipe = TrainConfig(
                dataset=dataset,
                dataset_params=dataset_params,
                arch=control_arch or "mlp",
                epochs=teacher_epochs,
                device=device,
            )
        elif teacher is not None:
            model, meta = load_checkpoint(teacher)
            recipe = TrainConfig.model_validate(meta.train_config) if meta.train_config else TrainConfig()
            ds = dataset or meta.dataset
            ds_params = (
                meta.train_config.get("dataset_params", {}) if ds == meta.dataset else {}
            ) | dataset_params
            recipe = recipe.model_copy(
                update={"dataset": ds, "dataset_params": ds_params, "device": device, "arch": meta.arch}
            )
            if "fine_tune" in meta.metrics:  # its recipe fine-tunes (a tenth of the rate), not a control's
                from_scratch = True
                recipe = recipe.model_copy(update={"epochs": teacher_epochs})
        else:
            recipe = TrainConfig(
                dataset=dataset or "mnist1d",
                dataset_params=dataset_params,
                arch=arch,
                objective=objective,
                objective_params=objective_params,
                epochs=teacher_epochs,
                device=device,
            )
        if augmentation is not None:
            recipe = recipe.model_copy(update={"augmentation": augmentation})
        data = recipe.prepare(load_dataset(recipe.dataset, **recipe.dataset_params))
        if onnx:
            from ml.onnx_model import load_onnx_teacher

            model = load_onnx_teacher(teacher, data, teacher_output)
        elif teacher is not None:
            check_fits(meta, data)
        else:
            model = _train_stage(recipe, f"teacher {recipe.arch}/{recipe.objective}", data)
        ce = None
        if cfg.control and onnx and control_arch is None:
            # No zoo architecture to copy: the report says there is no control, and the verdict cannot
            # be `undistillable`.
            cfg = cfg.model_copy(update={"control": False})
            err.print("no --control-arch for the ONNX teacher: the audit runs without a CE control")
        if cfg.control:
            from ml.teachers import control_recipe

            ce_recipe = control_recipe(recipe, control_arch, from_scratch=from_scratch)
            ce = _train_stage(ce_recipe, f"CE control {ce_recipe.arch}", data)
            cfg = cfg.model_copy(update={"control_arch": ce_recipe.arch})
        report = run_with_progress(
            "audit",
            cfg.seeds * cfg.epochs,
            lambda update: run_audit(
                cfg,
                model,
                data,
                control=ce,
                workers=workers,
                on_progress=lambda p: update(p.done, p.message, p.total),
            ),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    print_report(report)
    console.print(f"report: {out}  ({report['wall_s']:.0f} s)")


def print_report(stored: dict[str, Any]) -> None:
    """The audit as readable tables: per student, LS and every attack with margins and verdicts."""
    from ml.audit import AuditReport, report_findings
    from ml.audit.result import Section, Stats

    report = AuditReport.model_validate(stored)

    def pm(stats: Stats) -> str:
        se = stats.se
        return f"{stats.mean:.2f} ± {se:.2f}" if se == se else f"{stats.mean:.2f}"

    sections: list[tuple[str, Section, float | None]] = [("teacher", report, report.teacher.accuracy)]
    if report.control is not None:
        sections.append(("CE control", report.control, report.control.accuracy))
    for label, section, acc in sections:
        for arch, s in section.students.items():
            rows = [[f"LS {n}", pm(r.acc_best), pm(r.acc_last), "", "", ""] for n, r in s.ls.items()]
            for n, r in s.attacks.items():
                fid = pm(r.fidelity) if r.fidelity is not None else ""
                sig = "yes" if r.significant else "no"
                rows.append(
                    [n, pm(r.acc_best), pm(r.acc_last), fid, f"{r.margin:+.2f} ± {r.margin_se:.2f}", sig]
                )
            title = f"{label} (acc {acc:.2f}%) -> {arch}: {s.verdict}"
            print_table(title, ["row", "best acc", "last acc", "fidelity", "margin vs LS", "sig."], rows)
    for t, per_student in (report.safe_budget or {}).items():
        console.print(f"safe query budget ({t}): " + ", ".join(f"{a} {b}" for a, b in per_student.items()))
    console.print(f"verdict: [bold]{report.verdict}[/bold] — {report.verdict_reason}")
    found = report.findings or report_findings(report)
    console.print(found.headline)
    for line in found.why + found.to_conclude:
        console.print(f"  {line}")
    for step in found.next_steps:
        console.print(f"  next: {step}")


@bench_app.command("paper")
def bench_paper(
    benchmark: Annotated[str, typer.Option(help="a registered benchmark")] = "mnist1d",
    seeds: Annotated[int | None, typer.Option(help="default: the benchmark's (5)")] = None,
    epochs: Annotated[int | None, typer.Option(help="student epochs; default: the benchmark's")] = None,
    quick: Annotated[bool, typer.Option(help="the small, fast variant of the benchmark")] = False,
    out: Annotated[Path, typer.Option(help="folder for paper.json, paper.md and paper.svg")] = Path(
        "runs/paper"
    ),
    device: str = "auto",
    workers: Annotated[int, typer.Option(min=1, help="seeds trained at once, in separate processes")] = 1,
    keep: Annotated[
        Path | None,
        typer.Option(
            help="folder keeping every finished teacher, audit task and enforced student: run again with "
            "it to continue a stopped run"
        ),
    ] = None,
) -> None:
    """Every protection against every attack on the discriminating benchmark; last line is JSON."""
    from ml.benchmark import BENCHMARKS, budget_rows, paper_markdown, paper_rows, plot_paper, run_paper

    with one_line_errors():
        bench = BENCHMARKS.get(f"{benchmark}-quick" if quick else benchmark)
        bench = bench.model_copy(update={k: v for k, v in {"seeds": seeds, "epochs": epochs}.items() if v})
        report = run_with_progress(
            f"paper {benchmark}",
            1,
            lambda update: run_paper(
                bench,
                device=device,
                workers=workers,
                log=lambda m: err.print(m, highlight=False),
                on_progress=lambda p: update(p.done, p.message, p.total),
                keep=keep,
            ),
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps(report, indent=2))
    (out / "paper.md").write_text(paper_markdown(report, bench.student))
    plot_paper(report, bench.student, str(out / "paper.svg"))
    columns = [
        "protection",
        "teacher acc",
        "honest altered %",
        "I_1/I_4/I_16",
        "attack",
        "knockoff acc",
        "margin",
        "sig.",
    ]
    print_table(
        f"{benchmark}: {bench.student} students, {bench.seeds} seeds",
        columns,
        paper_rows(report, bench.student),
    )
    if report.get("budgets"):
        print_table(
            "budget curves: attackers holding B cached answers",
            ["black box", "budget B", "best knockoff", "acc", "margin vs best LS", "verdict"],
            budget_rows(report, bench.student),
        )
    console.print(f"report: {out / 'paper.json'}, table: {out / 'paper.md'}, plot: {out / 'paper.svg'}")
    console.print(json.dumps(report["summary"]), highlight=False, soft_wrap=True)
