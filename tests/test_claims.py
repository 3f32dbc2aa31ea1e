"""mars_ref.course.claims.check: the printed verdicts notebooks end their result cells with."""

import pytest

from mars_ref.course import claims


def test_prints_every_claim_and_passes_when_all_hold(capsys):
    claims.check({"one is less than two": 1 < 2, "the list is empty": not []})
    assert capsys.readouterr().out == "holds: one is less than two\nholds: the list is empty\n"


def test_fails_naming_the_claims_that_do_not_hold(capsys):
    with pytest.raises(AssertionError, match="claims that do not hold: two is less than one$"):
        claims.check({"two is less than one": 2 < 1, "one is less than two": 1 < 2})
    assert capsys.readouterr().out == "FAILS: two is less than one\nholds: one is less than two\n"
