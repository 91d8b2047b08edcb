"""The quarantine-and-replace idiom of docs/filters.md, per part (scripts/bench_budget.py).

Each dangerous attachment is kept in the quarantine (part.quarantine: one part-N.bin file
each, as in issue 25's figures) and replaced by a notice naming the entry.
"""

from defang import DANGEROUS_EXTENSIONS


def filter_part(msg, part):
    if part.has_extension(DANGEROUS_EXTENSIONS):
        qid = part.quarantine(f"executable {part.safe_filename}")
        part.replace(f"{part.filename} was removed (quarantine {qid}).",
                     filename=f"{part.filename}.removed.txt")
