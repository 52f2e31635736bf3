"""Every planted bug in planted_bugs.BUGS is caught by each property listed for it, within its default number of
examples; and without a bug, the same properties pass (so "caught" means the bug, not a broken harness)."""

import pytest
from planted_bugs import BUGS, run_bug, run_property, table  # this folder is on sys.path (pytest's rootdir import)


def test_at_least_twelve_distinct_bugs():
    assert len(BUGS) >= 12 and len({b.name for b in BUGS}) == len(BUGS)
    assert len({b.plant for b in BUGS}) == len(BUGS)


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_bug_is_caught(bug, capsys):
    outcomes = run_bug(bug)
    with capsys.disabled():  # the rows of the table (python tests/mutations/planted_bugs.py prints it whole)
        print("\n" + "\n".join(table({bug.name: outcomes}).splitlines()[2:]))
    missed = [o.test for o in outcomes if not o.caught]
    assert not missed, f"{bug.name} ({bug.description}) was not caught by {missed}"


@pytest.mark.parametrize("spec", sorted({s for b in BUGS for s in b.caught_by}))
def test_the_same_properties_pass_without_a_bug(spec):
    outcome = run_property(spec)
    assert not outcome.caught, outcome.error
    assert outcome.examples >= 10  # the property really ran its examples
