"""The SMTP transaction model (``defang.core.transaction``): each rule, event by event.

Both drivers (the milter session, the trial) follow these steps; their own tests
(tests/daemons/test_frontend.py, tests/filter/test_trial.py, tests/postfix) show it."""

from __future__ import annotations

from dataclasses import replace

from defang.core import config as configmod
from defang.core import hooks
from defang.core.transaction import NO_RECIPIENTS, OTHER_GROUP, Conversation
from defang.core.verdicts import CONTINUE, Verdict

ALL = frozenset(hooks.NAMES)
ACCEPT = Verdict("accept")
REJECT = Verdict("reject", "550", "5.1.1", "no such user")


def conversation(defined=ALL, **cfg) -> Conversation:
    return Conversation(defined, replace(configmod.load(None), **cfg))


def rcpt(c: Conversation, who: str, verdict: Verdict = CONTINUE, policy: str | None = None):
    step = c.begin("rcpt", who)
    assert step.ask is hooks.ENVELOPE["rcpt"]
    return c.replied(verdict, policy)


def test_each_stage_asks_the_hook_the_table_names_and_only_a_defined_one():
    c = conversation()
    for stage in ("connect", "helo", "mail"):
        assert c.begin(stage).ask is hooks.ENVELOPE[stage]
        assert c.replied(CONTINUE).answer is CONTINUE
    c = conversation(frozenset({"filter_end"}))
    for stage in ("connect", "helo", "mail"):
        step = c.begin(stage)
        assert step.ask is None and step.answer is CONTINUE and not step.ends
    assert c.begin("rcpt", "a@x").ask is None and c.recipients == ["a@x"]
    assert c.message().ask is hooks.BY_NAME["filter_end"]


def test_recipients_of_one_policy_group_share_a_transaction_the_others_get_452():
    c = conversation()
    c.begin("mail"), c.replied(CONTINUE)
    assert rcpt(c, "tag@x").answer is CONTINUE
    step = rcpt(c, "strict@x", policy="strict")
    assert step.answer is OTHER_GROUP and step.ends == "recipient" and step.why == "policy group"
    assert (OTHER_GROUP.code, OTHER_GROUP.dsn, OTHER_GROUP.action) == ("452", "4.5.3", "tempfail")
    assert rcpt(c, "tag2@x").answer is CONTINUE
    assert c.recipients == ["tag@x", "tag2@x"] and c.policy is None
    # the client's next transaction: the group of its first accepted recipient
    c.end()
    c.begin("mail"), c.replied(CONTINUE)
    assert rcpt(c, "strict@x", policy="strict").answer is CONTINUE
    assert rcpt(c, "tag@x").answer is OTHER_GROUP
    assert c.recipients == ["strict@x"] and c.policy == "strict"


def test_a_refused_first_recipient_does_not_choose_the_group():
    c = conversation()
    c.begin("mail"), c.replied(CONTINUE)
    assert rcpt(c, "nobody@x", REJECT, policy="strict").answer is REJECT
    assert rcpt(c, "tag@x").answer is CONTINUE and c.policy is None


def test_max_recipients_is_answered_without_asking():
    c = conversation(max_recipients=1)
    c.begin("mail"), c.replied(CONTINUE)
    rcpt(c, "a@x")
    step = c.begin("rcpt", "b@x")
    assert step.ask is None and step.why == "max_recipients" and step.answer.code == "452"


def test_accept_and_discard_end_what_they_end():
    c = conversation()
    c.begin("connect")
    assert c.replied(ACCEPT).ends == "connection"
    assert c.begin("mail").ends == "connection" and c.begin("mail").ask is None
    c = conversation()
    c.begin("mail"), c.replied(CONTINUE)
    assert rcpt(c, "a@x", Verdict("discard")).ends == "transaction"
    assert c.begin("rcpt", "b@x").ask is None and c.recipients == ["a@x", "b@x"]
    assert c.begin("mail").ask is not None  # the next transaction is asked again


def test_a_reject_at_mail_ends_the_transaction_at_rcpt_the_recipient():
    c = conversation()
    c.begin("mail")
    assert c.replied(REJECT).ends == "transaction"
    c.begin("mail"), c.replied(CONTINUE)
    assert rcpt(c, "a@x", REJECT).ends == "recipient"
    assert c.begin("rcpt", "b@x").ask is not None


def test_end_of_data_no_recipients_limits_and_message_hooks():
    c = conversation(max_message_size=100, max_headers=2)
    c.begin("mail"), c.replied(CONTINUE)
    assert c.data().answer is NO_RECIPIENTS
    rcpt(c, "a@x")
    assert c.data().answer.action == "continue"
    assert c.over_limit(101, 0, 0) is c.cfg.on_message_too_large
    assert c.over_limit(50, 3, 10) is c.cfg.on_header_too_large
    assert c.over_limit(50, 2, 10) is None
    assert c.message(c.cfg.on_header_too_large).answer == c.cfg.on_header_too_large.verdict
    assert c.message().ask is hooks.BY_NAME[hooks.MESSAGE[0]]
    assert conversation(frozenset({"filter_recipient"})).message().ask is None


def test_each_accepted_recipient_keeps_its_esmtp_arguments_as_sent_on_the_wire():
    c = conversation()
    c.begin("mail"), c.replied(CONTINUE)
    c.begin("rcpt", "a@x", ["NOTIFY=NEVER", "ORCPT=rfc822;a@x"]), c.replied(CONTINUE)
    c.begin("rcpt", "b@x", ["NOTIFY=SUCCESS"]), c.replied(REJECT)
    c.begin("rcpt", "c@x"), c.replied(CONTINUE)
    assert c.recipients == ["a@x", "c@x"]
    assert c.recipient_args == ["NOTIFY=NEVER ORCPT=rfc822;a@x", ""]
