"""How entry points end on a clear error and on Ctrl-C: one line, no traceback."""

from __future__ import annotations

import pytest

from happyhorse_train.errors import UserInputError, report_user_errors


@pytest.mark.parametrize("raised, code, line", [
    (UserInputError("data.batch_size=0: must be greater than 0"), 2, "error: data.batch_size=0: must be greater"),
    (KeyboardInterrupt(), 130, "error: interrupted; every file written completely is kept"),
])
def test_an_entry_point_ends_in_one_line(raised, code, line, capsys):
    @report_user_errors
    def main():
        raise raised

    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == code
    stderr = capsys.readouterr().err
    assert stderr.startswith(line) and len(stderr.strip().splitlines()) == 1
