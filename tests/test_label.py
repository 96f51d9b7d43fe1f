"""`alignkit label` without a browser: agreement math against textbook values, the store (import, hand-out,
answers), schema migrations, export that `rm`/`dpo` can load, and the CLI's sub-actions."""

from __future__ import annotations

import json
import math
import os

import pytest
from sqlalchemy import create_engine, inspect, select, text

from alignkit.cli import main as cli_main
from alignkit.data.loading import load_records
from alignkit.data.records import PreferencePair, Ranking
from alignkit.errors import AlignkitError, DataError
from alignkit.label import LabelConfig
from alignkit.label.agreement import cohen_kappa, counts_table, fleiss_kappa, percent_agreement, position_bias, wilson_interval
from alignkit.label.analysis import agreement_summary, agreement_with, export_rows, position_summary
from alignkit.label.db import LATEST, create_db_engine, metadata, migrate, schema_version, write_transaction
from alignkit.label.db import annotators as annotators_table
from alignkit.label.db import labels as labels_table
from alignkit.label.db import tasks as tasks_table
from alignkit.label.store import Answer, Label, LabelStore, Refused
from conftest import run_cli, write_jsonl

POSTGRES = os.environ.get("ALIGNKIT_TEST_POSTGRES_URL")  # e.g. postgresql+psycopg://postgres@127.0.0.1:5432/labels_test


@pytest.fixture(params=["sqlite"] + (["postgresql"] if POSTGRES else []))
def db(request, tmp_path):
    """A fresh database: a SQLite file, and PostgreSQL too when ALIGNKIT_TEST_POSTGRES_URL names one (its
    public schema is emptied first)."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    engine = create_engine(POSTGRES)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return POSTGRES


# --- agreement: textbook examples, computed by hand ---------------------------------------------------------


def test_cohen_kappa_textbook_example():
    # Wikipedia "Cohen's kappa", first example: 50 proposals, both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # p_o = 35/50 = 0.7; A says yes 25/50, B 30/50: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; κ = (0.7-0.5)/(1-0.5) = 0.4.
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    # Systematic disagreement is below chance: κ = (0 - 0.5) / 0.5 = -1.
    assert cohen_kappa(["x", "y"] * 5, ["y", "x"] * 5) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(["x"] * 4, ["x"] * 4))  # chance agreement 1: undefined
    with pytest.raises(ValueError):
        cohen_kappa(["x"], ["x", "y"])


def test_fleiss_kappa_textbook_example():
    # Wikipedia "Fleiss' kappa" worked example: 10 subjects, 14 raters, 5 categories.
    # P̄ = 0.378, P̄_e = 0.213, κ = 0.210.
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    # Percent agreement is Fleiss' P̄: subject 1 agrees fully (1.0), subject 2: (4+36+16+4-14)/(14*13) = 46/182.
    assert percent_agreement([["a"] * 14]) == 1.0
    assert percent_agreement([["b"] * 2 + ["c"] * 6 + ["d"] * 4 + ["e"] * 2]) == pytest.approx(46 / 182)


def test_fleiss_equals_scotts_pi_for_two_raters_and_handles_varying_counts():
    # Two raters, 4 items: agree on 3 → p_o = 0.75; pooled p(x) = 5/8, p(y) = 3/8 → p_e = 34/64; κ = (0.75 - 34/64)/(30/64) = 14/30.
    items = [["x", "x"], ["x", "x"], ["y", "y"], ["x", "y"]]
    assert fleiss_kappa(counts_table(items)) == pytest.approx(14 / 30)
    assert percent_agreement(items) == pytest.approx(0.75)
    # An item with one label is ignored; items with 2 and 3 labels mix (the generalised P_i).
    assert percent_agreement([["x"], ["x", "x", "y"], ["y", "y"]]) == pytest.approx((1 / 3 + 1) / 2)
    assert math.isnan(percent_agreement([["x"]])) and math.isnan(fleiss_kappa([[1, 0]]))


def test_wilson_interval_and_position_bias():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    bias = position_bias(30, 40)
    assert bias["rate"] == 0.75 and bias["expected"] == 0.5 and bias["ci_low"] > 0.5


# --- analysis of stored labels -------------------------------------------------------------------------------

PROMPT = [{"role": "user", "content": "Say hi"}]


def lab(task_id, annotator, verdict, ranking=None, shown=(0, 1), responses=("A", "B"), mode="pairwise", reason=None):
    return Label(task_id, mode, PROMPT, list(responses), 3, annotator, verdict, None if ranking is None else list(ranking), list(shown), reason, 1.0)


def test_export_majority_leaves_out_ties_both_bad_and_splits(tmp_path):
    labels = [
        lab(1, "ann", "ranked", [1, 0]), lab(1, "bob", "ranked", [1, 0]), lab(1, "cat", "ranked", [0, 1]),  # B wins 2:1
        lab(2, "ann", "tie"), lab(2, "bob", "tie"), lab(2, "cat", "ranked", [0, 1]),  # tie wins
        lab(3, "ann", "both_bad"),  # one label: both bad
        lab(4, "ann", "ranked", [0, 1]), lab(4, "bob", "ranked", [1, 0]),  # split 1:1
        lab(5, "ann", "ranked", [2, 0, 1], shown=(2, 1, 0), responses=("x", "y", "z"), mode="ranking"),
        lab(5, "bob", "ranked", [0, 2, 1], shown=(0, 1, 2), responses=("x", "y", "z"), mode="ranking"),
    ]  # fmt: skip
    rows, left_out = export_rows(labels)
    assert rows[0] == {"prompt": "Say hi", "chosen": "B", "rejected": "A", "task_id": 1, "votes": 2, "labels": 3}
    # Mean places: x (1+0)/2 = 0.5, z (0+1)/2 = 0.5, y 2: x and z tie and keep import order.
    assert rows[1] == {"prompt": "Say hi", "responses": ["x", "z", "y"], "task_id": 5, "labels": 2}
    assert left_out == {"tie": 1, "both_bad": 1, "no majority": 1}
    every, left = export_rows(labels, aggregate="all")
    assert sum("chosen" in r for r in every) == 6 and left == {"tie": 2, "both_bad": 1}
    assert every[0]["annotator"] == "ann"
    few, left = export_rows(labels, min_labels=3)
    assert len(few) == 1 and left["tasks with fewer than 3 labels"] == 3

    # Ready for `alignkit rm` / `alignkit dpo`: the comparison loader reads pairs and rankings.
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    records, _ = load_records(str(path), "comparison")
    assert isinstance(records[0], PreferencePair) and records[0].chosen == "B"
    assert isinstance(records[1], Ranking) and records[1].responses == ("x", "z", "y")


def test_agreement_summary_position_bias_and_judge_agreement():
    two = [lab(t, "ann", "ranked", [0, 1]) for t in range(4)] + [
        lab(0, "bob", "ranked", [0, 1]), lab(1, "bob", "ranked", [0, 1]), lab(2, "bob", "ranked", [1, 0]), lab(3, "bob", "tie"),
    ]  # fmt: skip
    summary = agreement_summary(two)
    # ann: first×4; bob: first, first, second, tie → p_o = 2/4; p_e = (4/4)(2/4) = 0.5 → κ = 0.
    assert summary["percent_agreement"] == 0.5 and summary["cohen_kappa"] == pytest.approx(0.0)
    assert summary["fleiss_kappa"] is None and summary["annotators"] == 2
    three = two + [lab(0, "cat", "ranked", [0, 1])]
    assert agreement_summary(three)["fleiss_kappa"] is not None and agreement_summary(three)["cohen_kappa"] is None
    # A ranking of 3 is 3 pairwise items.
    ranked = [lab(9, n, "ranked", [2, 1, 0], responses=("x", "y", "z"), mode="ranking") for n in ("ann", "bob")]
    assert agreement_summary(ranked)["items"] == 3

    # Left (first shown) won: shown (1, 0) and response 1 won → left won; shown (0, 1) and response 1 won → right.
    bias = position_summary([lab(1, "a", "ranked", [1, 0], shown=(1, 0)), lab(2, "a", "ranked", [1, 0], shown=(0, 1)), lab(3, "a", "tie")])
    assert bias["pairwise"]["decisions"] == 2 and bias["pairwise"]["rate"] == 0.5

    judge = [(PROMPT, "A", "B"), (PROMPT, "zzz", "B"), ([{"role": "user", "content": "other"}], "A", "B")]
    result = agreement_with([lab(1, "ann", "ranked", [0, 1]), lab(1, "bob", "ranked", [0, 1])], judge)
    assert result["matched"] == 1 and result["compared"] == 1 and result["agreement"] == 1.0


# --- the store -----------------------------------------------------------------------------------------------


@pytest.fixture
def samples(tmp_path):
    return write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": "What is 2+2?", "completions": ["4", "Four.", "4 ", "  ", "IV"]},  # 3 distinct → 3 pairs
        {"prompt": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}], "completions": ["Hello", "Hey"]},
        {"prompt": "Same", "completions": ["x", "x"]},  # one distinct answer: nothing to compare
    ])  # fmt: skip


def test_import_makes_pairs_or_rankings_and_is_idempotent(tmp_path, samples, db):
    store = LabelStore.open(db)
    report = store.import_samples(str(samples), mode="pairwise", max_annotators=2)
    assert (report.prompts, report.tasks_added) == (3, 4) and sum(report.skipped.values()) == 1
    again = store.import_samples(str(samples), mode="pairwise", max_annotators=2)
    assert (again.tasks_added, again.already_there) == (0, 4)
    ranking = store.import_samples(str(samples), mode="ranking", max_annotators=2)
    assert ranking.tasks_added == 2
    with store.engine.connect() as conn:
        rows = conn.execute(select(tasks_table).order_by(tasks_table.c.id)).all()
    assert [json.loads(r.responses) for r in rows[:3]] == [["4", "Four."], ["4", "IV"], ["Four.", "IV"]]
    assert json.loads(rows[3].prompt)[0] == {"role": "system", "content": "Be brief"} and rows[3].source.endswith(":2")
    assert json.loads(rows[4].responses) == ["4", "Four.", "IV"] and rows[4].mode == "ranking"

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completions": ["a", "b"]}, {"prompt": "p"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*completions"):
        store.import_samples(str(bad), mode="pairwise", max_annotators=1)
    assert store.import_samples(str(bad), mode="pairwise", max_annotators=1, skip_invalid=True).skipped


def test_hand_out_caps_at_m_never_repeats_and_records_the_shown_order(samples, db):
    store = LabelStore.open(db)
    store.import_samples(str(samples), mode="pairwise", max_annotators=2)
    ann, bob, cat = people = [store.authenticate(store.add_annotator(name)) for name in ("ann", "bob", "cat")]
    first = store.next_task(ann)
    assert store.next_task(ann) == first  # a reload gives the same task in the same order
    label_id = store.submit(ann, first.id, Answer("ranked", [1, 0], "right is clearer"))
    assert label_id > 0
    with pytest.raises(Refused) as refused:
        store.submit(ann, first.id, Answer("ranked", [0, 1]))
    assert refused.value.status == 409 and "already answered" in refused.value.message
    (stored,) = store.labels()
    # The annotator chose what they saw second: the stored ranking is in response indices.
    assert stored.ranking == [stored.shown_order[1], stored.shown_order[0]] and stored.reason == "right is clearer"
    assert first.responses == [stored.responses[i] for i in stored.shown_order]

    assert store.next_task(bob).id == first.id  # the task still has room for a second annotator
    store.submit(bob, first.id, Answer("tie"))
    assert store.next_task(cat).id != first.id  # M = 2 reached

    with pytest.raises(Refused) as refused:
        store.submit(cat, first.id, Answer("tie"))
    assert refused.value.status == 409 and "not given to you" in refused.value.message
    task = store.next_task(cat)
    for bad in (Answer("ranked", [0, 0]), Answer("ranked", [0, 1, 2]), Answer("ranked", None)):
        with pytest.raises(Refused) as refused:
            store.submit(cat, task.id, bad)
        assert refused.value.status == 400
    with pytest.raises(Refused):
        store.submit(cat, 999, Answer("tie"))
    store.skip(cat, task.id)
    assert store.next_task(cat).id != task.id

    # Labelling everything: each annotator sees each task at most once, and no task gets more than M labels.
    for person in people:
        while (shown := store.next_task(person)) is not None:
            store.submit(person, shown.id, Answer("ranked", [0, 1]))
    counts = {}
    for label in store.labels():
        counts.setdefault(label.task_id, []).append(label.annotator)
    assert all(len(names) == 2 == len(set(names)) for names in counts.values())
    overview = store.tasks_overview()
    assert overview["tasks_complete"] == overview["tasks"] == 4 and overview["labels"] == 8


def test_tokens_are_stored_only_as_hashes(db):
    store = LabelStore.open(db)
    token = store.add_annotator("ann", admin=True)
    assert store.authenticate(token).is_admin and store.authenticate("nope") is None and store.authenticate("") is None
    with store.engine.connect() as conn:
        stored = conn.execute(select(annotators_table.c.token_hash)).scalar_one()
    assert token not in stored and len(stored) == 64
    with pytest.raises(AlignkitError, match="already exists"):
        store.add_annotator("ann")
    new = store.add_annotator("ann", new_token=True)
    assert store.authenticate(token) is None and store.authenticate(new).name == "ann"


# --- migrations ----------------------------------------------------------------------------------------------


def test_an_older_database_is_upgraded_and_keeps_its_labels(db):
    path = db
    engine = create_db_engine(path)
    assert migrate(engine, target=1) == 1
    with write_transaction(engine) as conn:
        assert "reason" not in {c["name"] for c in inspect(conn).get_columns("labels")}
        conn.execute(annotators_table.insert().values(id=1, name="ann", token_hash="h" * 64, is_admin=False, created_at=0.0))
        conn.execute(tasks_table.insert().values(
            id=1, key="k", mode="pairwise", prompt=json.dumps(PROMPT), responses='["A", "B"]', max_annotators=3, source="f:1", created_at=0.0,
        ))  # fmt: skip
        conn.execute(labels_table.insert().values(
            task_id=1, annotator_id=1, verdict="ranked", ranking="[1, 0]", shown_order="[0, 1]", created_at=0.0,
        ))  # fmt: skip
    engine.dispose()

    store = LabelStore.open(path)  # opening migrates
    with store.engine.connect() as conn:
        assert conn.execute(select(schema_version.c.version)).scalar_one() == LATEST == 3
        inspector = inspect(conn)
        # After the migrations the database has exactly the tables and columns the code declares.
        for table in metadata.sorted_tables:
            assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.c.keys()), table.name
        assert "ix_labels_task" in {i["name"] for i in inspector.get_indexes("labels")}
    (old,) = store.labels()
    assert old.ranking == [1, 0] and old.reason is None and old.seconds is None
    assert LabelStore.open(path).labels() == [old]  # opening again changes nothing


def test_a_newer_database_is_refused(db):
    path = db
    store = LabelStore.open(path)
    with write_transaction(store.engine) as conn:
        conn.execute(schema_version.update().values(version=LATEST + 1))
    with pytest.raises(AlignkitError, match="newer than this alignkit"):
        LabelStore.open(path)


# --- the CLI -------------------------------------------------------------------------------------------------


def test_cli_actions_import_add_annotator_stats_export(tmp_path, samples, capsys):
    db = str(tmp_path / "cli.db")
    # The action and the files are words after `label`, before or after the flags.
    assert cli_main(["label", "import", "--db", db, str(samples), "--annotators-per-task", "1"]) == 0
    assert cli_main(["label", "--db", db, "import", str(samples), "--mode", "ranking"]) == 0
    assert "4 new tasks" in capsys.readouterr().err
    assert cli_main(["label", "add-annotator", "ann", "--db", db, "--admin"]) == 0
    token = capsys.readouterr().out.strip()
    store = LabelStore.open(db)
    ann = store.authenticate(token)
    while (task := store.next_task(ann)) is not None:  # a consistent taste: alphabetical order, wherever shown
        store.submit(ann, task.id, Answer("ranked", sorted(range(len(task.responses)), key=lambda p: task.responses[p])))
    assert cli_main(["label", "--action", "stats", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "6 tasks (4 pairwise, 2 ranking)" in out and "position bias" in out
    prefs = tmp_path / "prefs.jsonl"
    assert cli_main(["label", "export", "--db", db, "--out", str(prefs)]) == 0
    records, _ = load_records(str(prefs), "comparison")
    assert sum(isinstance(r, PreferencePair) for r in records) == 4 and sum(isinstance(r, Ranking) for r in records) == 2

    assert cli_main(["label", "stats", "--db", db, "--against", str(prefs), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # Our own export, judged against the same labels, agrees with itself: 4 pairs + 2 rankings (3 + 1 pairs).
    assert report["against"]["agreement"] == 1.0 and report["against"]["compared"] == report["against"]["pairs_in_file"] == 8


def test_cli_errors_are_clean(tmp_path, capsys):
    db = str(tmp_path / "x.db")
    result = run_cli("label", "import", "--db", db)  # one real process: a clean message, exit 2, no traceback
    assert result.returncode == 2 and result.stderr.startswith("error: nothing to import") and "Traceback" not in result.stderr
    for argv, needle in [
        (["label", "--db", db], "no action given"),
        (["label", "fly", "--db", db], "action' must be one of"),
        (["label", "serve", "extra", "--db", db], "takes no words after it"),
        (["label", "export", "--db", db, "--out", str(tmp_path / "p.jsonl")], "no labels to export"),
    ]:
        assert cli_main(argv) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["label", "stats", "--db", db, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["label", "--help"])
    help_text = capsys.readouterr().out
    assert "import,serve,add-annotator,remove-annotator,export,stats" in help_text and "--annotators-per-task" in help_text


def test_config_validation():
    with pytest.raises(AlignkitError, match="one name"):
        LabelConfig(action="add-annotator").validate()
    with pytest.raises(AlignkitError, match="--out"):
        LabelConfig(action="export").validate()
    LabelConfig(action="import", inputs=["a.jsonl"]).validate()
