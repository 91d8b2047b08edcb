"""``defang replay PATH...``: many messages through the filter, each as ``defang test`` runs one.

The parent finds the messages (``sources``), checks that the filter (and the
``--compare`` one) loads, then forks a pool of ``--jobs`` processes.  Each process loads
the filter(s) once and runs ``Trial.run`` on the messages it is handed; the parent
shows a progress bar, gathers one record per message, sums them up (``summarise``) and
prints the summary (``replayview``).  With ``--release-accepted`` it then releases the
quarantine entries the filter now accepts.

Filter errors and their tracebacks are not logged by the pool's processes: each is in
the summary with its message's name, and ``defang test NAME`` shows the traceback.

Like ``defang test``, a replay sends no notices unless ``--send-mail``; the summary
counts those the filter asked for, and those sent.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any

from defang.cli.sources import Item, SourceError, find, quarantine_items
from defang.cli.trial import EXIT_ERROR, Envelope, Trial, as_json, envelope_from_args
from defang.core.config import Config
from defang.workers.loader import FilterLoadError
from defang.workers.stores.quarantine import (
    QuarantineError,
    QuarantineStore,
    quarantine_dir,
    release,
)
from defang.workers.stores.submit import Submission

EXIT_DIFFER = 1  # --compare found differences, or a release failed
EXIT_USAGE = 2
# What a replay keeps of each trial (``trial.as_json``): the stages are left to ``defang test``.
KEEP = ("outcome", "ended", "actions", "would", "tags", "quarantine", "notices", "sent", "recipients",
        "error", "exit", "seconds")  # fmt: skip

# The per-process state of the pool: the trials, one per filter, and the envelope of
# messages without a saved one.
_trials: list[Trial] = []
_default: Envelope = Envelope()


def main(cfg: Config, args: argparse.Namespace) -> int:
    from defang.cli import replayview

    if not args.paths and not args.quarantine:
        print("defang replay: no PATH given and no --quarantine", file=sys.stderr)
        return EXIT_USAGE
    try:
        items, skipped = find(args.paths)
        if args.quarantine:
            items += quarantine_items(quarantine_dir(cfg))
    except SourceError as exc:
        print(exc, file=sys.stderr)
        return EXIT_ERROR
    if not items:
        print(f"defang replay: no messages (the quarantine store {quarantine_dir(cfg)} is empty)",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    if args.release_accepted and not any(item.qid for item in items):
        print("defang replay: --release-accepted: none of the messages is a quarantine entry",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    configs = [cfg] if not args.compare else [cfg, replace(cfg, filter=Path(args.compare).resolve())]
    for c in configs:  # here, once: a filter that does not load is one line, not a broken pool
        try:
            Trial(c).close()
        except FilterLoadError as exc:
            print(exc, file=sys.stderr)
            return EXIT_ERROR
    start = time.monotonic()
    try:
        records = run(items, configs, envelope_from_args(args), args.jobs, show_progress=not args.json,
                      send_mail=args.send_mail)  # fmt: skip
    except BrokenProcessPool:
        print("defang replay: a replay process died (the filter crashed it?); --jobs 1 shows on which "
              "message", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("defang replay: interrupted", file=sys.stderr)
        return 130
    summary = summarise(records, [str(c.filter) for c in configs], time.monotonic() - start, args.jobs,
                        skipped, args.slowest)  # fmt: skip
    summary["send_mail"] = args.send_mail
    released: list[dict[str, Any]] = []
    release_failed = False
    if args.release_accepted:
        released, release_failed = release_accepted(cfg, items, records, args.yes, args.json)
        summary["released"] = released
    replayview.show(summary, records, args.json)
    if any(f["errors"] for f in summary["filters"]):
        return EXIT_ERROR
    return EXIT_DIFFER if summary.get("differ") or release_failed else 0


def run(items: list[Item], configs: list[Config], default: Envelope, jobs: int,
        show_progress: bool = True, send_mail: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """One record per item, in order: ``{"name", "qid", "results": [one per filter]}``."""
    from defang.cli.replayview import progress

    spool = tempfile.mkdtemp(prefix="defang-replay-")
    try:
        with progress(len(items), show_progress) as advance:
            if jobs == 1 or len(items) == 1:
                _start(configs, default, spool, send_mail, quiet=False)
                try:
                    return [advance(_replay(item)) for item in items]
                finally:
                    _stop()
            context = multiprocessing.get_context("fork")  # the parent's imports, already done
            chunk = max(1, min(32, len(items) // (jobs * 16)))
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start,
                                     initargs=(configs, default, spool, send_mail)) as pool:  # fmt: skip
                return [advance(record) for record in pool.map(_replay, items, chunksize=chunk)]
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _start(configs: list[Config], default: Envelope, spool: str, send_mail: bool = False,
           quiet: bool = True) -> None:  # fmt: skip
    global _trials, _default
    if quiet:
        logging.getLogger("defang").setLevel(logging.CRITICAL)
    _trials = [Trial(c, spool, send_mail=send_mail) for c in configs]
    _default = default


def _stop() -> None:
    for trial in _trials:
        trial.close()


def _replay(item: Item) -> dict[str, Any]:
    record: dict[str, Any] = {"name": item.name, "qid": item.qid}
    try:
        if item.problem:
            raise OSError(item.problem)
        raw = item.read()
        env = _envelope(item.envelope)
    except (OSError, ValueError) as exc:
        error = f"{getattr(exc, 'strerror', None) or exc}"
        record["results"] = [{"outcome": {"action": "error"}, "actions": [], "would": [], "tags": [],
                              "quarantine": [], "notices": [], "sent": [], "error": error, "seconds": 0.0}
                             for _ in _trials]  # fmt: skip
        return record
    record["results"] = [_compact(as_json(trial.run(raw, env, item.name))) for trial in _trials]
    return record


def _envelope(saved: dict[str, Any] | None) -> Envelope:
    """A quarantine entry's envelope, with the command line's for what it lacks."""
    if not saved:
        return _default
    d = _default
    return replace(d, sender=saved["sender"], recipients=saved["recipients"] or d.recipients,
                   ip=saved["ip"] or d.ip, hostname=saved["hostname"], helo=saved["helo"] or d.helo,
                   queue_id=saved["queue_id"] or d.queue_id)  # fmt: skip


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in KEEP}


def key(result: dict[str, Any]) -> tuple:
    """What --compare compares: how the message ends, and what is done to it."""
    o = result["outcome"]
    return (o["action"], o.get("code"), o.get("dsn"), o.get("text"), result.get("error") is not None,
            repr(result["actions"]), repr(result["quarantine"]), repr(result["would"]))  # fmt: skip


def summarise(records: list[dict[str, Any]], filters: list[str], seconds: float, jobs: int, skipped: int,
              slowest: int) -> dict[str, Any]:  # fmt: skip
    """The figures an admin reads after a replay, per filter, and the differences."""
    out: dict[str, Any] = {
        "messages": len(records), "seconds": round(seconds, 3),
        "per_second": round(len(records) / seconds, 1) if seconds > 0 else None,
        "jobs": jobs, "skipped_files": skipped, "filters": [],
    }  # fmt: skip
    for i, name in enumerate(filters):
        results = [(r["name"], r["results"][i]) for r in records]
        outcomes: Counter[str] = Counter()
        replies: Counter[str] = Counter()
        actions: Counter[str] = Counter()
        would: Counter[str] = Counter()
        tags: Counter[str] = Counter()
        notices = {"asked": 0, "sent": 0}
        errors = []
        for msg, res in results:
            o = res["outcome"]
            outcomes[o["action"]] += 1
            if res["error"]:
                errors.append({"name": msg, "error": res["error"].splitlines()[0]})
            if o.get("code"):
                replies[f"{o['action']} {o['code']} {o.get('dsn') or ''} {o.get('text') or ''}".strip()] += 1
            if o["action"] in ("continue", "accept"):  # a refused message's actions are not applied
                actions.update({a[0] for a in res["actions"]})
            if res["quarantine"]:
                actions["quarantine"] += 1
            would.update(entry.split(" ", 1)[0] for entry in res["would"])
            tags.update(res["tags"])
            notices["asked"] += len(res["notices"])
            notices["sent"] += sum(1 for how in res["sent"] if how.startswith("via "))
        out["filters"].append({
            "filter": name, "outcomes": dict(outcomes.most_common()),
            "replies": dict(replies.most_common(10)), "actions": dict(actions.most_common()),
            "would": dict(would.most_common()),
            "tags": dict(tags.most_common(20)), "notices": notices, "errors": errors,
            "slowest": [{"name": msg, "seconds": round(res["seconds"], 4)}
                        for msg, res in sorted(results, key=lambda x: -x[1]["seconds"])[:slowest]],
        })  # fmt: skip
    if len(filters) == 2:
        out["differ"] = [r["name"] for r in records if key(r["results"][0]) != key(r["results"][1])]
    return out


def release_accepted(cfg: Config, items: list[Item], records: list[dict[str, Any]], yes: bool,
                     quiet: bool) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
    """Release the quarantine entries the (first) filter now accepts; ``(records, any failed)``."""
    chosen = [(item, rec) for item, rec in zip(items, records, strict=True)
              if item.qid and rec["results"][0]["outcome"]["action"] in ("continue", "accept")
              and not rec["results"][0]["error"]]  # fmt: skip
    if not chosen:
        print("defang replay: no quarantined message is accepted now: nothing to release", file=sys.stderr)
        return [], False
    if not yes:
        if not sys.stdin.isatty():
            print(f"defang replay: {len(chosen)} quarantined messages are accepted now; release them with "
                  "--yes (no terminal to ask on)", file=sys.stderr)  # fmt: skip
            return [], True
        answer = input(f"Release {len(chosen)} quarantined messages the filter now accepts? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("defang replay: nothing released", file=sys.stderr)
            return [], False
    settings = Submission.for_release(cfg)
    done, failed = [], False
    for item, _ in chosen:
        assert item.store is not None and item.qid is not None
        try:
            record = release(QuarantineStore(item.store), item.qid, settings)
        except QuarantineError as exc:
            failed = True
            print(f"{item.qid}: {exc}", file=sys.stderr)
            continue
        done.append({"id": item.qid, **record})
        if not quiet:
            print(f"released {item.qid} via {record['via']} to {', '.join(record['recipients'])}")
    return done, failed
