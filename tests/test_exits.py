"""The exit-status table (trainer/exits.py STATUSES) agrees with the constants and the restart rule, and the one
document that shows it shows exactly what `python -m trainer.exits` prints."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT
from trainer import exits

START = "<!-- exit statuses: `python -m trainer.exits` prints it -->\n"
END = "<!-- end of exit statuses -->"


def test_every_status_constant_has_a_row_and_the_right_restart_verdict():
    constants = {v for k, v in vars(exits).items() if k.startswith("EXIT_")}
    rows = {int(re.match(r"\d+", status).group()): action for status, _, _, action in exits.STATUSES}
    assert constants <= set(rows), f"statuses without a row: {constants - set(rows)}"
    for status, action in rows.items():
        if status == exits.EXIT_OK:
            assert action == "done"
        elif status == exits.FIRST_RETRIED:  # the 128+N row
            assert action == "retried" and exits.is_retried(exits.signal_status(15))
        else:
            assert action == ("retried" if exits.is_retried(status) else "permanent"), status


def test_the_documents_show_the_generated_table_once():
    printed = subprocess.run(
        [sys.executable, "-m", "trainer.exits"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert printed == exits.markdown_table()
    docs = [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and START in p.read_text()]
    assert len(docs) == 1, f"the exit-status table must stand in one document, found {docs}"
    text = docs[0].read_text()
    block = text[text.index(START) + len(START) : text.index(END)]
    assert block == printed, f"{docs[0]}'s exit-status table is stale: paste `.venv/bin/python -m trainer.exits`"
