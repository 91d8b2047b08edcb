"""A filter built as a chain of small rules, in the order they are asked (defang.Chain).

Each rule is a module in rules/ with the same hooks as a filter.py.  At every hook the
chain asks the rules that have it, in this order, until one decides: the first decision
stands (an allow list first, then the cheap envelope checks, then the content).  Rules
after it are not asked; what earlier rules did (a rewritten recipient) stays.

Switch a rule to monitor mode without touching code, in defang.toml:

    [filter]
    monitor_rules = ["charset_block"]

Its refusals are then only logged and stamped in an X-Defang-Would header, naming the
rule, and the next rule is asked.  Each rule that decides tags the message with its name
(``<rule>:monitor`` when it only would have): ``defangctl status`` counts the tags.

Try it:  defang test --filter filters/examples/modular/filter.py some.eml
         defang replay --filter filters/examples/modular/filter.py ~/Maildir
"""

from pathlib import Path

from defang import Chain

RULES = [
    "allow_list",  # first: mail from a trusted client or sender skips everything below
    "helo_ours",  # a client that greets us with our own name
    "wildcard_address",  # first.last.anything@our.domain -> first.last@our.domain
    "header_chars",  # control characters, unencoded 8-bit in address and subject headers
    "charset_block",  # ks_c_5601-1987, euc-kr
    "bad_filename",  # executables, also inside archives and behind double extensions
]

chain = Chain.from_directory(Path(__file__).parent / "rules", RULES)
globals().update(chain.hooks)  # filter_relay, filter_helo, ... : one for each hook a rule has
