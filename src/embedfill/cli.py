"""The command line: each command is a few lines over one library call."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import application, extras, health
from . import keys as keymod
from .application import (
    BackfillOptions,
    abackfill,
    adefer_index_plan,
    aensure_schema,
    arefresh_warning,
    astatus,
)
from .config import Config, load_config
from .db.connect import Database, resolve_database
from .engine.state import ABANDON_AFTER_S, abandon_requests
from .errors import EmbedfillError, UsageError
from .models import Report
from .render import model_plan_text, model_status_text, report_table, status_tables
from .watch import WatchOptions

T = TypeVar("T")


# an API key's shape: a provider's prefix, or a long run of key characters
_KEY_LIKE = re.compile(r"\b(?:sk|pk|rk|key)[-_][\w-]{6,}|(?<![\w/.-])[\w-]{40,}")


class _Context(typer.Context):
    """Click's context, whose parse errors never echo an unexpected argument: it may be a
    secret typed where none belongs (an API key after `keys set`, which reads it from
    stdin), and the terminal, its scrollback and a CI log would keep it."""

    def fail(self, message: str) -> NoReturn:
        if message.startswith("Got unexpected extra argument"):
            message = (
                "Got unexpected extra arguments (not shown here, in case one is a secret); "
                "see --help for what this command takes (an API key goes to `keys set` "
                "on its stdin)."
            )
        # elsewhere ("No such command 'sk-...'", an option's bad value): what looks like
        # a key is masked, a typo of a command name is still shown
        super().fail(_KEY_LIKE.sub("(a value not shown: it may be a secret)", message))


# every command and group of the CLI parses with it
typer.core.TyperCommand.context_class = _Context
typer.core.TyperGroup.context_class = _Context

app = typer.Typer(
    help="Find and fill missing pgvector embeddings in PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    help="Bring-your-own-key: per-tenant API keys, encrypted at rest.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
triggers_app = typer.Typer(
    help="Change triggers: queue each changed row for `embedfill watch` (polling needs none).",
    no_args_is_help=True,
)
app.add_typer(triggers_app, name="triggers")
model_app = typer.Typer(
    help="Change a target's embedding model with zero downtime (plan first: it is read-only).",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")

# Piped output gets a wide fixed width so tables are never cut to 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Host:
    """Where the commands get their config and database, and how ``--processes`` starts
    more of them. The default reads ``--config`` (or the demo default) and the
    environment; another edge hands its own to ``run`` (``manage.py embedfill``, in
    contrib/django, takes both from the Django settings)."""

    #: the config from ``--config PATH`` (None when not given)
    config: Callable[[Path | None], Config] = load_config
    #: the database, unless the command forces the embedded one (the demo)
    database: Callable[[], Database] | None = None
    #: the command line that runs this CLI again, in a child process
    argv: tuple[str, ...] = (sys.executable, "-m", "embedfill")
    #: what a child process's environment adds to this one's (None: nothing)
    env: Mapping[str, str] | None = None


@dataclass
class State:
    config_path: Path | None
    debug: bool
    host: Host = Host()

    def config(self) -> Config:
        return self.host.config(self.config_path)

    def database(self, *, force_embedded: bool = False) -> Database:
        if self.host.database is not None and not force_embedded:
            return self.host.database()
        return resolve_database(
            notice=lambda m: err.print(m, style="yellow"), force_embedded=force_embedded
        )


def _state(ctx: typer.Context) -> State:
    assert isinstance(ctx.obj, State)
    return ctx.obj


@contextmanager
def _errors(state: State) -> Iterator[None]:
    """One line per error, with its exit code; the cause too with --debug."""
    try:
        yield
    except EmbedfillError as exc:
        err.print(f"embedfill: {exc}", style="red", markup=False)
        if state.debug and exc.__cause__:
            err.print(f"cause: {exc.__cause__!r}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err.print(f"embedfill: database error: {first}", style="red", markup=False)
        raise typer.Exit(1) from None


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


GRACE_S = ABANDON_AFTER_S  # after a first SIGTERM/SIGINT, requests in flight get this long
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Shutdown:
    """SIGINT and SIGTERM for the commands that run until done or stopped (backfill,
    worker, watch).

    The first signal sets ``stop``: a backfill cancels its job, a worker or a watch takes
    no more work and finishes what it has. Provider requests still in flight GRACE_S
    later are abandoned (engine.state.abandon_requests): their rows stay NULL, never
    failed, and a job that goes on gets the chunks back in its queue; so a provider that
    never answers holds the process a few seconds, not ``timeout_s``. A second signal
    exits at once with 128 + its number (130 for SIGINT, 143 for SIGTERM, what a shell
    shows for a process that signal ended): nothing more is sent or written, and a job's
    chunks in flight go to another worker, as a killed worker's do. ``backfill
    --processes`` children are sent each signal this process gets."""

    def __init__(self) -> None:
        self.received = 0
        self.children: list[subprocess.Popen[bytes]] = []
        self.stop = asyncio.Event()
        self.abandon = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> asyncio.Event:
        """Handle the signals in the running loop (call it from the command's coroutine,
        before it starts any task); returns ``stop``."""
        self._loop = asyncio.get_running_loop()
        abandon_requests.set(self.abandon)  # inherited by every task started from here
        for sig in SIGNALS:
            self._loop.add_signal_handler(sig, self.signalled, sig)
        return self.stop

    @contextmanager
    def outside_loop(self) -> Iterator[None]:
        """Handle the signals while no event loop runs (waiting for children)."""
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        for sig in SIGNALS:
            signal.signal(sig, lambda signum, _frame: self.signalled(signum))
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def signalled(self, sig: int) -> None:
        self.received += 1
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)
        name = signal.Signals(sig).name
        if self.received > 1:
            os.write(2, f"embedfill: {name} again: exiting now, exit {128 + sig}.\n".encode())
            os._exit(128 + sig)
        err.print(
            f"embedfill: {name}: stopping after the requests in flight (at most {GRACE_S:g}s "
            f"more; rows not written stay NULL); {name} again exits at once.",
            markup=False,
        )
        self._stopping()

    def _stopping(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self.stop.set()
        loop.call_later(GRACE_S, self.abandon.set)


def _run_cancellable(
    make: Callable[[asyncio.Event], Coroutine[Any, Any, T]], shutdown: _Shutdown | None = None
) -> T:
    """Run a coroutine; SIGINT/SIGTERM ask it to stop (see _Shutdown)."""
    shutdown = shutdown or _Shutdown()

    async def runner() -> T:
        return await make(shutdown.attach())

    return asyncio.run(runner())


@app.callback()
def main_callback(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="EMBEDFILL_CONFIG",
            help="TOML config file; without one, the built-in demo target.",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show causes and debug logs.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    host = ctx.obj if isinstance(ctx.obj, Host) else Host()
    ctx.obj = State(config_path=config, debug=debug, host=host)


@app.command()
def status(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Rows and missing embeddings per target and tenant."""
    state = _state(ctx)
    with _errors(state):
        config = state.config()
        statuses = asyncio.run(astatus(config, state.database(), target))
    if as_json:
        print(json.dumps({"targets": [s.to_dict() for s in statuses]}))
    else:
        status_tables(out, statuses)


@app.command()
def check(
    ctx: typer.Context,
    target: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME", help="Only this target; repeat for several (default: every target)."
        ),
    ] = None,
    max_missing: Annotated[
        int, typer.Option(metavar="N", help="Rows with a NULL embedding tolerated per target.")
    ] = 0,
    max_stale: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Stale plus outdated-model vectors tolerated per target (both no longer "
            "describe their row; unverified ones are shown, never counted).",
        ),
    ] = 0,
    tenant_max_missing: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Missing rows tolerated per tenant (default: no per-tenant bound): one "
            "tenant left NULL fails the check even when the total is within --max-missing.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Exit 0 when every target is within the bounds, 3 when one is not (one line per
    target): for cron, CI and Kubernetes jobs. Read-only; errors keep their own codes."""
    state = _state(ctx)
    with _errors(state):
        bounds = health.Bounds(
            max_missing=max_missing, max_stale=max_stale, tenant_max_missing=tenant_max_missing
        )
        config = state.config()
        results = asyncio.run(health.acheck(config, state.database(), target or [], bounds))
    ok = all(r.ok for r in results)
    if as_json:
        print(json.dumps({"ok": ok, "targets": [r.to_dict() for r in results]}))
    else:
        for r in results:
            print(r.line())
    raise typer.Exit(0 if ok else health.OVER_BOUND_EXIT_CODE)


@app.command()
def backfill(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Target name (default: the first).")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Plan only: counts, requests, tokens, cost; writes nothing."
        ),
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(help="Inputs per embedding request (1-2048).")
    ] = None,
    tenant: Annotated[
        list[str] | None, typer.Option(help="Only these tenants (repeatable).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
    defer_index: Annotated[
        bool,
        typer.Option(
            "--defer-index",
            help="Index-aware mode for large backlogs: drop the column's vector indexes, fill, "
            "rebuild them CONCURRENTLY. Asks first.",
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm --defer-index without asking.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    exclusive: Annotated[
        bool,
        typer.Option(
            "--exclusive",
            help="Refuse (exit 4) when a job of this target runs, instead of joining.",
        ),
    ] = False,
    processes: Annotated[
        int, typer.Option(help="Worker processes on this machine working on the job (1-64).")
    ] = 1,
    enqueue: Annotated[
        bool,
        typer.Option(
            "--enqueue", help="Create the job, print its id and return: `embedfill worker`s do it."
        ),
    ] = False,
    refresh: Annotated[
        bool,
        typer.Option(
            "--refresh",
            help="Also re-embed stale rows (text changed since embedded) and outdated-model "
            "rows (embedded with another model or size), not only NULL ones.",
        ),
    ] = False,
) -> None:
    """Embed the rows whose embedding is NULL. The backfill is a job cut into chunks; if a
    job of the target is already running, this joins it. Exit 3 when some rows failed (or,
    with --dry-run, would fail for want of a usable key). SIGTERM or SIGINT cancels the
    job (exit 1; provider requests in flight get 4 s more, their rows stay NULL); a
    second signal exits at once: 143 (SIGTERM) or 130 (SIGINT)."""
    state = _state(ctx)
    if not 1 <= processes <= 64:
        with _errors(state):
            raise UsageError(f"--processes must be between 1 and 64, not {processes}.")
    opts = BackfillOptions(
        target=target,
        dry_run=dry_run,
        batch_size=batch_size,
        tenants=tuple(tenant or ()),
        limit=limit,
        actor=_actor(),
        defer_index=defer_index,
        refresh=refresh,
    )
    with _errors(state):
        config = state.config()
        db = state.database()
        if defer_index and not dry_run:
            _confirm_defer_index(config, db, opts, yes=yes)
        said: str | None = None  # the refresh's warning, said before it starts: once
        if refresh and not dry_run:
            said = asyncio.run(arefresh_warning(config, db, opts))
            if said is not None:
                err.print(f"embedfill: warning: {said}", style="yellow", markup=False)
        if enqueue and not dry_run:
            report = asyncio.run(abackfill(config, db, opts, exclusive=exclusive, enqueue=True))
            _print_enqueued(report, as_json=as_json)
            return
        shutdown = _Shutdown()
        children = _Children(state, 0 if dry_run else processes - 1, shutdown)  # a plan: none
        try:
            report = _backfill_with_progress(
                config,
                db,
                opts,
                show=not as_json and err.is_terminal,
                exclusive=exclusive,
                on_start=children.start,
                shutdown=shutdown,
            )
        finally:
            children.wait()
    if report.joined:
        err.print(f"embedfill: joined job {report.run_id}, already running for this target.")
    for warning in report.warnings:
        if said is not None and _same_sentence(warning, said):
            continue  # the report keeps it (JSON, library); the terminal had it already
        err.print(f"embedfill: warning: {warning}", style="yellow", markup=False)
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        report_table(out, report)
    raise typer.Exit(backfill_exit_code(report))


def _same_sentence(a: str, b: str) -> bool:
    """The same warning, whatever count it gave (the rows it counts may change between
    the word before the start and the job's own)."""
    return re.sub(r"[\d,]+", "#", a) == re.sub(r"[\d,]+", "#", b)


def _print_enqueued(report: Report, *, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "job_id": report.run_id,
                    "target": report.target,
                    "status": report.status,
                    "joined": report.joined,
                }
            )
        )
        return
    how = "is already running as" if report.joined else "queued as"
    out.print(f"backfill of {report.target} {how} job {report.run_id}")
    print(report.run_id)


class _Children:
    """``--processes N``: N-1 ``embedfill worker --job ID`` processes beside this one,
    started once the job exists. They get the environment (keys, DATABASE_URL), never a
    secret in argv, and leave when the job is over. Each is its own process group: a
    Ctrl-C at the terminal reaches this process alone, which passes each signal it gets
    on to them (_Shutdown), so a first one is a first one for every process."""

    def __init__(self, state: State, count: int, shutdown: _Shutdown) -> None:
        self.state, self.count, self.shutdown = state, count, shutdown
        self.procs = shutdown.children

    def start(self, run_id: int) -> None:
        argv = list(self.state.host.argv)
        if self.state.config_path is not None:
            argv += ["--config", str(self.state.config_path)]
        for _ in range(self.count):
            self.procs.append(
                subprocess.Popen(
                    [*argv, "worker", "--job", str(run_id)],
                    stdout=subprocess.DEVNULL,
                    process_group=0,
                    env=None
                    if self.state.host.env is None
                    else {**os.environ, **self.state.host.env},
                )
            )

    def _env(self) -> dict[str, str] | None:
        extra = self.state.host.env
        return None if extra is None else {**os.environ, **extra}

    def wait(self) -> None:
        if not self.procs:
            return
        with self.shutdown.outside_loop():
            for proc in self.procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait()


def backfill_exit_code(report: Report) -> int:
    """0 all done; 3 some rows failed, or would fail (dry run); 1 cancelled."""
    if report.status == "cancelled":
        err.print("embedfill: cancelled after the batches in flight; run again to resume.")
        return 1
    if report.failed or report.would_fail or report.status == "partial":
        return 3
    return 0


def _confirm_defer_index(config: Config, db: Database, opts: BackfillOptions, *, yes: bool) -> None:
    plan = asyncio.run(adefer_index_plan(config, db, opts))
    if plan is None:
        err.print("embedfill: no vector index on the column; --defer-index changes nothing.")
        return
    err.print(plan, markup=False)
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("--defer-index drops and rebuilds vector indexes; confirm with --yes.")
    if not typer.confirm("Continue?", default=False, err=True):
        raise UsageError("Not confirmed; nothing was changed.")


def _backfill_with_progress(
    config: Config,
    db: Database,
    opts: BackfillOptions,
    *,
    show: bool,
    exclusive: bool = False,
    on_start: Callable[[int], None] | None = None,
    shutdown: _Shutdown | None = None,
) -> Report:
    if not show:
        return _run_cancellable(
            lambda cancel: abackfill(
                config, db, opts, cancel=cancel, exclusive=exclusive, on_start=on_start
            ),
            shutdown,
        )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("planning" if opts.dry_run else "embedding", total=None)

        def on_progress(r: Report) -> None:
            done = r.embedded + r.skipped + r.failed
            bar.update(task, total=r.missing_before + r.stale_before, completed=done)

        return _run_cancellable(
            lambda cancel: abackfill(
                config,
                db,
                opts,
                cancel=cancel,
                on_progress=on_progress,
                exclusive=exclusive,
                on_start=on_start,
            ),
            shutdown,
        )


@app.command()
def verify(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Target name (default: the first).")] = None,
    sample: Annotated[
        int | None,
        typer.Option(help="Re-embed this many random rows that hold a vector (default 100)."),
    ] = None,
    all_rows: Annotated[
        bool, typer.Option("--all", help="Re-embed every row that holds a vector.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show rows, requests, tokens, cost and keys; send nothing."),
    ] = False,
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="Then re-embed the wrong vectors (a --refresh job: other stale rows too).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Re-embed a random sample of rows that hold a vector and compare with the stored
    vectors by cosine similarity. Exit 3 when any is below the provider's
    verify_min_cosine (default 0.99) or a row could not be re-embedded (with --fix: 0
    once the refresh that followed succeeded). Wrong vectors are recorded as stale."""
    from .render import verify_table

    state = _state(ctx)
    with _errors(state):
        config = state.config()
        result = asyncio.run(
            application.averify(
                config,
                state.database(),
                target,
                sample=sample,
                all_rows=all_rows,
                dry_run=dry_run,
                fix=fix,
            )
        )
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        verify_table(out, result)
    raise typer.Exit(result.exit_code)


@app.command()
def adopt(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Target name (default: the first).")] = None,
    verify_sample: Annotated[
        int | None,
        typer.Option(
            help="First re-embed this many random unverified rows; adopt nothing (exit 3) "
            "if any disagrees."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Record provenance for vectors embedfill did not write (unverified), without
    calling the provider: the md5 of each row's text now and the configured model."""
    from .errors import VerificationFailed
    from .render import adopt_lines

    state = _state(ctx)
    with _errors(state):
        config = state.config()
        try:
            result = asyncio.run(
                application.aadopt(config, state.database(), target, verify_sample=verify_sample)
            )
        except VerificationFailed as exc:  # the check's result too, then the one line
            if as_json:
                print(json.dumps(exc.details))
            raise
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        adopt_lines(out, result)


@app.command()
def seed(
    ctx: typer.Context,
    rows: Annotated[int, typer.Option(help="Rows of workflow_insights.")] = 10_000,
    missing: Annotated[int, typer.Option(help="Rows left with a NULL embedding.")] = 382,
    tenants: Annotated[int, typer.Option(help="Tenants the rows are spread over.")] = 5,
    dims: Annotated[int, typer.Option(help="Vector dimensions of the embedding column.")] = 384,
) -> None:
    """Create the demo tables (tenants, workflow_insights) with realistic texts."""
    from .seed import seed as do_seed

    state = _state(ctx)
    with _errors(state):
        db = state.database()
        with psycopg.connect(db.url, autocommit=True) as conn:
            result = do_seed(conn, rows=rows, missing=missing, tenants=tenants, dims=dims)
    out.print(
        f"seeded public.workflow_insights: {result.rows:,} rows, {result.missing:,} "
        f"with a NULL embedding, over {result.tenants} tenants, vector({result.dimensions})"
    )


@app.command()
def demo(ctx: typer.Context) -> None:
    """Seed 10,000 rows (382 missing), adopt the rest, status, a dry run, backfill offline."""
    from .seed import seed as do_seed

    state = _state(ctx)
    with _errors(state):
        config = load_config(None)
        db = state.database(force_embedded=True)
        out.rule("1. seed: the empty-dev-database lesson")
        with psycopg.connect(db.url, autocommit=True) as conn:
            r = do_seed(conn)
        out.print(
            f"seeded {r.rows:,} workflow insights over {r.tenants} tenants; "
            f"{r.missing} have a NULL embedding"
        )
        out.rule("2. adopt: the vectors that were there before embedfill")
        adopted = asyncio.run(application.aadopt(config, db))
        out.print(
            f"recorded {adopted.adopted:,} pre-filled vectors as written by {adopted.model}, "
            "so that status can tell when their text or the model changes. (The seed wrote "
            "placeholders; on your database, `embedfill adopt --verify-sample 200` first "
            "re-embeds a sample and refuses if any vector disagrees.)"
        )
        out.rule("3. status")
        status_tables(out, asyncio.run(astatus(config, db)))
        out.rule("4. backfill --dry-run")
        plan = _backfill_with_progress(
            config, db, BackfillOptions(dry_run=True, actor=_actor()), show=err.is_terminal
        )
        report_table(out, plan)
        out.rule("5. backfill (all-MiniLM-L6-v2 on this CPU, offline)")
        done = _backfill_with_progress(
            config, db, BackfillOptions(actor=_actor()), show=err.is_terminal
        )
        report_table(out, done)
        out.rule("6. status")
        status_tables(out, asyncio.run(astatus(config, db)))
    if done.failed:
        raise typer.Exit(3)


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Create or upgrade embedfill's own schema; run once as its owner (then DML is enough)."""
    state = _state(ctx)
    with _errors(state):
        before, after = asyncio.run(application.amigrate(state.database()))
    if before == after:
        out.print(f"embedfill schema: version {after} (already current)")
    else:
        was = "missing" if before is None else f"version {before}"
        out.print(f"embedfill schema: version {after} (was {was})")


AllowModelChange = Annotated[
    bool,
    typer.Option(
        "--allow-model-change",
        help="Start even if the configured model differs from the one that wrote the "
        "column's vectors (they are then re-embedded in place).",
    ),
]


MetricsPort = Annotated[
    int | None,
    typer.Option(
        help="Serve this process's provider and row counters on /metrics at this port "
        "(Prometheus scrapes each worker; the service's own /metrics has only its own).",
    ),
]
MetricsHost = Annotated[
    str,
    typer.Option(help="With --metrics-port: the address to listen on (0.0.0.0 in a container)."),
]


def _serve_metrics(port: int | None, host: str) -> Any:
    """The process's metrics on ``host:port`` (a thread), as an Observer for its runs;
    None without a port."""
    if port is None:
        return None
    import prometheus_client

    from .http.metrics import Metrics

    if not 1 <= port <= 65535:
        raise UsageError(f"--metrics-port must be between 1 and 65535, not {port}.")
    metrics = Metrics(service=False)
    try:
        prometheus_client.start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise UsageError(
            f"Cannot serve metrics on {host}:{port} ({exc.strerror}); choose another "
            "--metrics-port."
        ) from None
    err.print(f"embedfill: metrics on http://{host}:{port}/metrics")
    return metrics


@app.command()
def worker(
    ctx: typer.Context,
    target: Annotated[
        list[str] | None,
        typer.Option(help="Only jobs of these targets (repeatable; default: every target)."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Chunks worked on at once (default: \\[engine] worker_chunks)."),
    ] = None,
    job: Annotated[int | None, typer.Option(hidden=True)] = None,
    allow_model_change: AllowModelChange = False,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "127.0.0.1",
) -> None:
    """Work on backfill jobs created anywhere (backfill, backfill --enqueue, the HTTP API)
    until SIGTERM or SIGINT: then finish the chunks in flight and exit 0 (provider requests
    get 4 s more; what is left of the chunks goes back to the queue, its rows NULL). A
    second signal exits at once: 143 (SIGTERM) or 130 (SIGINT)."""
    from .runtime import Runtime, startup_checks
    from .worker import Worker, work_on_job

    state = _state(ctx)
    with _errors(state):
        _check_concurrency(concurrency)
    logging.getLogger("embedfill").setLevel(logging.DEBUG if state.debug else logging.INFO)

    async def run() -> None:
        stop = _Shutdown().attach()
        config, db = state.config(), state.database()
        await aensure_schema(db)
        if job is not None:  # one of backfill --processes: until the job is over
            w = Worker(config, db, targets=target or None, concurrency=concurrency)
            await work_on_job(w, job, stop=stop)
            return
        await startup_checks(config, db, target or None, allow_model_change=allow_model_change)
        observer = _serve_metrics(metrics_port, metrics_host)
        runtime = Runtime(
            config, db, targets=target or None, concurrency=concurrency, observer=observer
        )
        assert runtime.worker is not None
        names = ", ".join(target or [t.name for t in config.targets])
        err.print(f"embedfill: worker {runtime.worker.name} serving jobs of: {names}")
        runtime.start()
        try:
            await runtime.wait(stop)
        finally:
            await runtime.stop()  # the chunks in flight are finished first

    with _errors(state):
        asyncio.run(run())


@app.command()
def watch(
    ctx: typer.Context,
    target: Annotated[
        list[str] | None,
        typer.Option(help="Watch these targets (repeatable; default: every target)."),
    ] = None,
    interval: Annotated[
        float, typer.Option(help="Seconds between polls for NULL rows (0.2-3600).")
    ] = 5.0,
    sweep_interval: Annotated[
        float,
        typer.Option(help="Seconds between sweeps for stale and outdated-model rows (1-86400)."),
    ] = 300.0,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Chunks worked on at once (default: \\[engine] worker_chunks)."),
    ] = None,
    allow_model_change: AllowModelChange = False,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "127.0.0.1",
) -> None:
    """Keep targets filled and fresh until SIGTERM or SIGINT (then finish what is in
    flight, provider requests within 4 s, and exit 0; a second signal exits at once, 143
    or 130): new NULL rows, rows whose text changed, rows of another model. Changes queued
    by `embedfill triggers install` are picked up at once; polling and a stale sweep need
    no DDL. The chunks are done by this process's worker and by any `embedfill worker`."""
    from .runtime import awatch

    state = _state(ctx)
    with _errors(state):
        _check_watch_intervals(interval, sweep_interval)
        _check_concurrency(concurrency)
    logging.getLogger("embedfill").setLevel(logging.DEBUG if state.debug else logging.INFO)

    async def run() -> None:
        stop = _Shutdown().attach()
        config, db = state.config(), state.database()
        for name in target or ():
            config.target(name)  # an unknown name is a config error now
        await aensure_schema(db)
        names = ", ".join(target or [t.name for t in config.targets])
        err.print(
            f"embedfill: watching {names} (poll every {interval:g}s, sweep every "
            f"{sweep_interval:g}s)"
        )
        await awatch(
            config,
            db,
            target or None,
            stop,
            opts=WatchOptions(
                interval_s=interval,
                sweep_interval_s=sweep_interval,
                allow_model_change=allow_model_change,
            ),
            concurrency=concurrency,
            observer=_serve_metrics(metrics_port, metrics_host),
        )

    with _errors(state):
        asyncio.run(run())


def _check_concurrency(concurrency: int | None) -> None:
    if concurrency is not None and not 1 <= concurrency <= 64:
        raise UsageError(f"--concurrency must be between 1 and 64, not {concurrency}.")


def _check_watch_intervals(interval: float, sweep_interval: float) -> None:
    if not 0.2 <= interval <= 3600:
        raise UsageError(f"--interval must be between 0.2 and 3600 seconds, not {interval}.")
    if not 1 <= sweep_interval <= 86400:
        raise UsageError(
            f"--sweep-interval must be between 1 and 86400 seconds, not {sweep_interval}."
        )


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    no_worker: Annotated[
        bool,
        typer.Option(
            "--no-worker",
            help="Only the API: jobs are worked on by `embedfill worker` processes elsewhere.",
        ),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="Also keep every target filled and fresh, as `embedfill watch` does."
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(help="With --watch: seconds between polls for NULL rows.")
    ] = 5.0,
    sweep_interval: Annotated[
        float, typer.Option(help="With --watch: seconds between stale sweeps.")
    ] = 300.0,
    allow_model_change: AllowModelChange = False,
) -> None:
    """Run the admin HTTP service (needs ADMIN_SECRET or AUTH_SECRET to accept requests)."""
    with _errors(_state(ctx)):
        extras.require("server")
    import uvicorn

    from .http import create_app
    from .http.logs import configure

    state = _state(ctx)
    configure(logging.DEBUG if state.debug else logging.INFO)
    with _errors(state):
        options = None
        if watch:
            from .runtime import startup_checks

            _check_watch_intervals(interval, sweep_interval)
            options = WatchOptions(
                interval_s=interval,
                sweep_interval_s=sweep_interval,
                allow_model_change=allow_model_change,
            )
            asyncio.run(
                startup_checks(
                    state.config(), state.database(), allow_model_change=allow_model_change
                )
            )
        application = create_app(
            state.config(), database=state.database(), worker=not no_worker, watch=options
        )
    uvicorn.run(application, host=host, port=port, log_config=None)


# ---------------------------------------------------------------------------- keys


@keys_app.command("set")
def keys_set(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="Tenant id, as in the tenant column.")],
) -> None:
    """Store a tenant's API key, read from stdin (never from the command line)."""
    state = _state(ctx)
    with _errors(state):
        keymod.check_tenant_id(tenant)  # before the key is asked for
        if sys.stdin.isatty():
            key = getpass.getpass(f"API key for tenant {tenant}: ")
        else:
            key = sys.stdin.read()
        key = key.strip()
        if not key:
            raise UsageError(
                "No key was given on stdin; pipe it in, e.g. "
                "`printenv TENANT_KEY | embedfill keys set --tenant T`."
            )
        token = keymod.encrypt(key, os.environ)
        hint = keymod.key_hint(key)
        asyncio.run(application.put_key(state.database(), tenant, token, hint))
    out.print(f"stored the key for tenant {tenant} ({hint})")


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Tenants with a stored key, masked to its last 4 characters."""
    state = _state(ctx)
    with _errors(state):
        infos = asyncio.run(application.list_keys(state.database()))
    if as_json:
        print(
            json.dumps(
                {
                    "keys": [
                        {
                            "tenant": k.tenant,
                            "key": k.key_hint,
                            "updated_at": k.updated_at.isoformat(),
                        }
                        for k in infos
                    ]
                }
            )
        )
        return
    if not infos:
        out.print("no tenant keys stored")
    for k in infos:
        out.print(f"{k.tenant}\t{k.key_hint}\t{k.updated_at:%Y-%m-%d %H:%M}")


@keys_app.command("delete")
def keys_delete(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
) -> None:
    """Forget a tenant's stored key."""
    state = _state(ctx)
    with _errors(state):
        deleted = asyncio.run(application.delete_key(state.database(), tenant))
        if not deleted:
            raise UsageError(f"No key is stored for tenant {tenant!r}; see `embedfill keys list`.")
    out.print(f"deleted the key of tenant {tenant}")


@keys_app.command("new-master-key")
def keys_new_master_key() -> None:
    """Print a fresh EMBEDFILL_MASTER_KEY (store it in your secret manager)."""
    print(keymod.new_master_key())


# ---------------------------------------------------------------------------- triggers

_PRINT_SQL = typer.Option("--print-sql", help="Print the SQL it would run; change nothing.")


def _triggers(ctx: typer.Context, target: str | None, install: bool, print_sql: bool) -> None:
    state = _state(ctx)
    with _errors(state):
        plan, script = asyncio.run(
            application.atriggers(state.config(), state.database(), target, install, print_sql)
        )
    if print_sql:
        print(script, end="")
        return
    for note in plan.notes[1:]:
        err.print(f"embedfill: {note}", markup=False)
    names = ", ".join(plan.trigger_names)
    if not plan.statements:
        out.print(f"no change triggers on {plan.table} to remove", markup=False)
    elif install:
        out.print(f"installed change triggers {names} on {plan.table}", markup=False)
    else:
        out.print(f"removed change triggers {names} from {plan.table}", markup=False)


@triggers_app.command("install")
def triggers_install(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Target name (default: the first).")] = None,
    print_sql: Annotated[bool, _PRINT_SQL] = False,
) -> None:
    """Install the target's change triggers (AFTER INSERT, and UPDATE OF the text's columns):
    each changed row's id is queued in embedfill.changes, which `watch` looks at several
    times a second.
    Needs the TRIGGER privilege on the table and CREATE on schema embedfill (exit 5)."""
    _triggers(ctx, target, True, print_sql)


@triggers_app.command("uninstall")
def triggers_uninstall(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Target name (default: the first).")] = None,
    print_sql: Annotated[bool, _PRINT_SQL] = False,
) -> None:
    """Remove the target's change triggers and their function (needs ownership of the table)."""
    _triggers(ctx, target, False, print_sql)


_VECTOR_TYPE = typer.Option(
    "--vector-type",
    help="The new vectors' type: vector or halfvec (2 bytes a dimension; an index takes "
    "up to 4,000 dimensions). Default: the live column's.",
)


@model_app.command("plan")
def model_plan(
    ctx: typer.Context,
    target: Annotated[str, typer.Option(help="The target whose model changes.")],
    to: Annotated[
        str, typer.Option("--to", help="The provider section of the config with the new model.")
    ],
    strategy: Annotated[
        str,
        typer.Option(
            help="Where the new vectors go: table (a side table; the default) or column "
            "(a shadow column on the live table)."
        ),
    ] = "table",
    vector_type: Annotated[str | None, _VECTOR_TYPE] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """What changing the model takes, before anything is done (read-only): rows and
    tokens to embed, cost, time at the provider's limits, the index to build and the
    disk it needs, and each step with the locks it takes. Exit 2 when it cannot work."""
    state = _state(ctx)
    with _errors(state):
        plan = asyncio.run(
            application.aplan_model(
                state.config(),
                state.database(),
                target,
                to,
                strategy,
                vector_type=vector_type,
            )
        )
    if as_json:
        print(json.dumps(plan.to_dict()))
    else:
        model_plan_text(out, plan)


_STRATEGY = typer.Option(
    help="Where the new vectors go: table (a side table; the default) or column "
    "(a shadow column on the live table)."
)


@model_app.command("start")
def model_start(
    ctx: typer.Context,
    target: Annotated[str, typer.Option(help="The target whose model changes.")],
    to: Annotated[
        str, typer.Option("--to", help="The provider section of the config with the new model.")
    ],
    strategy: Annotated[str, _STRATEGY] = "table",
    vector_type: Annotated[str | None, _VECTOR_TYPE] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Make the new vectors' home, fill it as a job and build the twin of each live
    vector index concurrently; the app keeps searching the old vectors meanwhile. Run it
    again to go on after a stop. Exit 0 at phase ready, 3 when the fill left rows
    behind, 4 when another change of the column's model is under way."""
    state = _state(ctx)
    with _errors(state):
        config, db = state.config(), state.database()
        status = _run_cancellable(
            lambda cancel: application.amodel_start(
                config,
                db,
                target,
                to,
                strategy,
                vector_type=vector_type,
                actor=_actor(),
                cancel=cancel,
            )
        )
    if as_json:
        print(json.dumps(status.to_dict()))
    else:
        model_status_text(out, [status])
    raise typer.Exit(0 if status.phase == "ready" else 3)


@model_app.command("status")
def model_status(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """How far each target's change of model is: phase, coverage, rows missing or stale,
    the new index, the gates and which vectors the app's searches use. Read-only."""
    state = _state(ctx)
    with _errors(state):
        statuses = asyncio.run(application.amodel_status(state.config(), state.database(), target))
    if as_json:
        print(json.dumps({"targets": [s.to_dict() for s in statuses]}))
    else:
        model_status_text(out, statuses)


def _model_done(status: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status.to_dict()))
    else:
        model_status_text(out, [status])


_TARGET = typer.Option(help="The target whose model changes.")
_JSON = typer.Option("--json", help="One JSON object on stdout.")


@model_app.command("verify")
def model_verify(
    ctx: typer.Context,
    target: Annotated[str, _TARGET],
    sample: Annotated[
        int | None, typer.Option(metavar="N", help="Rows re-embedded for the sample gate.")
    ] = None,
    as_json: Annotated[bool, _JSON] = False,
) -> None:
    """Check the new vectors after a final catch-up: the gates coverage, shape, sample
    and recall_at_10, recorded for the cutover. Exit 0 when every gate passes, 3 when
    one fails."""
    state = _state(ctx)
    with _errors(state):
        status = asyncio.run(
            application.amodel_verify(state.config(), state.database(), target, sample=sample)
        )
    _model_done(status, as_json)
    raise typer.Exit(0 if status.gates and all(g["pass"] for g in status.gates.values()) else 3)


@model_app.command("cutover")
def model_cutover(
    ctx: typer.Context,
    target: Annotated[str, _TARGET],
    as_json: Annotated[bool, _JSON] = False,
) -> None:
    """Switch the app's searches to the new vectors (embedfill.active_models), in one
    short transaction. Exit 3, naming the gate, unless every gate passed."""
    state = _state(ctx)
    with _errors(state):
        status = asyncio.run(application.amodel_cutover(state.config(), state.database(), target))
    _model_done(status, as_json)


@model_app.command("rollback")
def model_rollback(
    ctx: typer.Context,
    target: Annotated[str, _TARGET],
    as_json: Annotated[bool, _JSON] = False,
) -> None:
    """Switch the app's searches back to the old vectors (instant: they were kept); before
    a cutover, give the change up."""
    state = _state(ctx)
    with _errors(state):
        status = asyncio.run(application.amodel_rollback(state.config(), state.database(), target))
    _model_done(status, as_json)


@model_app.command("finalize")
def model_finalize(
    ctx: typer.Context,
    target: Annotated[str, _TARGET],
    yes: Annotated[bool, typer.Option("--yes", help="Drop them: there is no undo.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Even within the rollback window.")
    ] = False,
    as_json: Annotated[bool, _JSON] = False,
) -> None:
    """Drop the vectors the app no longer searches: the old ones after a cutover, the new
    ones after a rollback. Only with --yes."""
    state = _state(ctx)
    with _errors(state):
        status = asyncio.run(
            application.amodel_finalize(
                state.config(), state.database(), target, yes=yes, force=force
            )
        )
    _model_done(status, as_json)


def _short_helps(group: typer.Typer) -> None:
    """Each command's line in its group's list: the first sentence of its docstring on
    one line (Typer keeps the docstring's line breaks there, cutting sentences)."""
    for info in group.registered_commands:
        doc = info.callback.__doc__ if info.callback else None
        if info.short_help is None and doc:
            text = " ".join(doc.split())
            end = text.find(". ")
            info.short_help = text if end < 0 else text[: end + 1]
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _short_helps(sub.typer_instance)


_short_helps(app)


def load_dotenv() -> None:
    """``./.env`` into the environment (never over a variable already set); a file that is
    not UTF-8 is exit 2."""
    from dotenv import load_dotenv as load

    dotenv = Path.cwd() / ".env"
    try:
        load(dotenv, override=False)
    except OSError:
        pass
    except UnicodeDecodeError:  # an editor saved it as Latin-1 or UTF-16
        err.print(
            f"embedfill: {dotenv} is not UTF-8 text; save it as UTF-8.",
            style="red",
            markup=False,
        )
        raise SystemExit(UsageError.exit_code) from None


def main() -> None:
    load_dotenv()
    app()


def run(args: Sequence[str], host: Host, prog_name: str = "embedfill") -> int:
    """Run one command line (``args`` without the program's name) with ``host``'s config
    and database; returns its exit code, what ``embedfill`` itself would exit with."""
    try:
        app(args=list(args), obj=host, prog_name=prog_name)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
