"""``python -m gradpower_ds advise-p``: advice from a study relation, refusal to invent one, the run's inputs."""

import json

import pytest

from gradpower_ds.jobs.advise import advise, main, relation, study_points, suggest


def study(rows):
    """A p_vs_batch.json with `rows` of (batch tokens, noise scale, per-seed best p)."""
    return {"rows": [{"batch_tokens": b, "noise_scale": n, "best_p": max(set(seeds), key=seeds.count),
                      "best_p_per_seed": seeds, "losses": {"1": [2.0] * len(seeds), "1.2": [2.1] * len(seeds)}}
                     for b, n, seeds in rows]}


FALLING = study([(1024, 8192, [1.5, 1.5, 1.5]), (4096, 8192, [1.2, 1.2, 1.2]), (16384, 8192, [0.8, 0.8, 0.8])])


def test_relation_interpolates_in_log_noise_ratio_and_holds_the_ends():
    points = relation(study_points(FALLING))
    assert [p["x"] for p in points] == [0.125, 0.5, 2.0]
    assert suggest(0.5, points) == (1.2, "interpolated")
    assert suggest(0.25, points)[0] == pytest.approx(1.35)  # halfway in log between 0.125 and 0.5
    assert suggest(0.01, points) == (1.5, "below the study's range: its smallest B / B_simple")
    assert suggest(10.0, points)[0] == 0.8
    text = advise(noise=4096, batch_tokens=1024, study=FALLING)
    assert "B / B_simple = 0.25" in text and "suggested p = 1.35" in text and "1.2, 1.5" in text


@pytest.mark.parametrize("rows", [
    [(1024, 8192, [1.2, 1.0, 1.2]), (4096, 8192, [1.0, 1.2, 0.8])],   # seeds disagree everywhere
    [(1024, 8192, [1.0, 1.0, 1.0]), (4096, 8192, [1.0, 1.0, 1.0])],   # the same p at every batch
    [(1024, 8192, [0.8, 0.8, 0.8]), (4096, 8192, [1.5, 1.5, 1.5])],   # rising with the batch: not the theory's
    [(1024, 8192, [1.2, 1.2, 1.2])],                                     # one batch
])
def test_no_relation_gives_no_number(rows):
    text = advise(noise=4096, batch_tokens=2048, study=study(rows))
    assert "no advice: the study shows no relation" in text and "suggested p" not in text
    assert "the study (benchmarks/p_vs_batch.py" in text  # the evidence is still printed


def write_run(path, noise_values, world=2, config=None, run_noise=None):
    path.mkdir()
    lines = ["step,tokens,train_loss,val_loss,lr,tokens_per_s,elapsed_s,noise_scale"]
    lines += [f"{i},{i * 10},2.0,,0.001,5.0,1.0,{'' if v is None else v}" for i, v in enumerate(noise_values, 1)]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    (path / "config.json").write_text(json.dumps(config or {"micro_batch": 4, "seq_len": 128, "grad_accum": 2}))
    (path / "summary.json").write_text(json.dumps({"world_size": world, "noise_scale": run_noise}))


def test_main_reads_the_run(tmp_path, capsys):
    write_run(tmp_path / "run", [None, 3000.0, None, 5000.0])
    relation_file = tmp_path / "relation.json"
    relation_file.write_text(json.dumps(FALLING))
    main([str(tmp_path / "run"), "--relation", str(relation_file)])  # not completed: the last logged value
    out = capsys.readouterr().out
    assert "metrics.csv, step 4 (the smoothed value" in out
    assert "batch 2,048 tokens, gradient noise scale B_simple 5,000 tokens" in out
    write_run(tmp_path / "done", [3000.0, 5000.0], run_noise=4096.0)  # completed: the run's own B_simple
    main([str(tmp_path / "done"), "--relation", str(relation_file)])
    out = capsys.readouterr().out
    assert "summary.json (the run's summed" in out and "B_simple 4,096 tokens, B / B_simple = 0.5" in out
    assert "suggested p = 1.20" in out
    main([str(tmp_path / "run"), "--relation", str(relation_file), "--batch-tokens", "16384"])
    assert "batch 16,384 tokens" in capsys.readouterr().out


def test_main_says_what_is_missing(tmp_path, capsys):
    write_run(tmp_path / "quiet", [None, None])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "quiet")])
    assert "logs no noise_scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
    assert "no metrics.csv" in capsys.readouterr().err
    write_run(tmp_path / "run", [1000.0])
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run")])
    assert "pass --batch-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--batch-tokens", "0"])
    assert "--batch-tokens 0 must be > 0" in capsys.readouterr().err
