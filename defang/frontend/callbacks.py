"""libmilter's callbacks, routed to the ``Session`` of each connection, every stage answered.

Three things an MTA can send that would otherwise go wrong (issue 25, item 11):

* **A callback with no session yet**: after the MTA reused its milter connection for the
  next SMTP session (QUIT_NC), pymilter starts afresh at connect; a session is made there
  and then with the protocol negotiated before (`Session.adopt`: with leading-space
  headers, a session that had not negotiated wrote "Name:  value"), and any other stage
  that finds none gets one too, with one log line.  An abort or close with no session is
  simply answered.
* **A callback that raises** (a bug of ours): one log line with the connection ID, and the
  stage still gets its answer (``Session.failed``): never pymilter's own "untrapped
  exception", which on a stage negotiated "no reply" leaves libmilter out of step with the
  MTA, so that end of message is never answered.
* **Text that is not UTF-8 where pymilter wants text** (a header *name*, the HELO name,
  the client's host name): pymilter's C code fails to make a ``str`` before any Python
  code of ours runs, and prints the ``UnicodeDecodeError`` through ``sys.excepthook``.
  Ours takes the bytes from the exception (``exc.object``) and hands them to the
  session of the connection (``Session.undecodable``); pymilter's exception policy is
  CONTINUE, so libmilter and the MTA stay in step.  Which session: pymilter gives each
  connection a Python thread state of its own (made at its first callback, deleted at
  close) and runs all of that connection's callbacks in it, whatever OS thread libmilter
  picks, so a ``threading.local`` here holds one connection's session.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import milter

from defang.frontend.service import FrontEnd
from defang.frontend.session import Session

log = logging.getLogger("defang.milter")

_current = threading.local()


def install_callbacks(fe: FrontEnd) -> None:
    """Route libmilter's callbacks to the Session attached to each context."""

    def session_of(ctx: Any, stage: str) -> Session:
        session = ctx.getpriv()
        if session is None:
            session = Session(fe, ctx)
            ctx.setpriv(session)
            session.adopt()
            if stage != "connect":  # connect: the MTA reused the milter connection (QUIT_NC)
                log.warning("conn %s: the MTA sent %s before the connection began: a new session",
                            session.id, stage)  # fmt: skip
        _current.session = session
        return session

    def route(stage: str, method: Callable[..., int]) -> Callable[..., int]:
        def callback(ctx: Any, *args: Any) -> int:
            session = session_of(ctx, stage)
            try:
                return method(session, *args)
            except Exception as exc:
                return session.failed(stage, exc)

        return callback

    def negotiate(ctx: Any, opts: list[int]) -> int:
        session = Session(fe, ctx)
        ctx.setpriv(session)
        _current.session = session
        try:
            return session.negotiate(opts)
        except Exception as exc:
            return session.failed("negotiate", exc)

    def ending(stage: str, method: Callable[[Session], int]) -> Callable[[Any], int]:
        def callback(ctx: Any) -> int:
            session = ctx.getpriv()
            if session is None:  # nothing begun, nothing to end
                return milter.CONTINUE
            try:
                return method(session)
            except Exception as exc:
                return session.failed(stage, exc)
            finally:
                if stage == "close":
                    ctx.setpriv(None)
                    _current.session = None

        return callback

    milter.set_connect_callback(route("connect", Session.connect))
    milter.set_helo_callback(route("helo", Session.hello))
    milter.set_envfrom_callback(route("mail", Session.envfrom))
    milter.set_envrcpt_callback(route("rcpt", Session.envrcpt))
    milter.set_header_callback(route("header", Session.header))
    milter.set_body_callback(route("body", Session.body))
    milter.set_eom_callback(route("eom", Session.eom))
    milter.set_abort_callback(ending("abort", Session.abort))
    milter.set_close_callback(ending("close", Session.close))
    milter.register("defang", negotiate=negotiate, data=route("data", Session.data))
    milter.set_exception_policy(milter.CONTINUE)  # only for what never reached us: see above
    sys.excepthook = _make_excepthook(sys.excepthook)


def _make_excepthook(previous: Callable[..., Any]) -> Callable[..., None]:
    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        session = getattr(_current, "session", None)
        if isinstance(exc, UnicodeDecodeError) and tb is None and session is not None:
            try:
                session.undecodable(bytes(exc.object))
                return
            except Exception as inner:
                log.error("conn %s: could not take the MTA's bytes %r: %s", session.id, exc.object[:200],
                          inner)  # fmt: skip
                return
        previous(kind, exc, tb)

    return hook
