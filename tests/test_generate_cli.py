"""`generate`: a question about an image, answered by a run, a .ckpt or an HF export, streamed to stdout; the
answer is the one `eval` would give (the same greedy decoding from the same prompt)."""

import contextlib
import io

import pytest
from evalkit import trained_run, write_benchmark_files

from lightning_sp.cli import main
from lightning_sp.inference import Predictor, Question
from lightning_sp.generate import generate_from_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_and_image(tmp_path_factory):
    files = write_benchmark_files(tmp_path_factory.mktemp("gen"))
    return trained_run(tmp_path_factory), files["image_root"] / "img1.png"


def reference(run_dir, image, question, max_new_tokens):
    predictor = Predictor.from_checkpoint(run_dir, device="cpu")
    return predictor.predict(
        [Question("q", question, image=str(image))], max_new_tokens=max_new_tokens, progress=False
    )[0]


def test_one_question_streams_the_answer_eval_gives(run_and_image):
    run_dir, image = run_and_image
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                [
                    "generate",
                    f"ckpt={run_dir}",
                    f"image={image}",
                    "question=Where is the red circle?",
                    "max_new_tokens=6",
                    "device=cpu",
                ]
            )
            == 0
        )
    expected = reference(run_dir, image, "Where is the red circle?", 6)
    assert expected and out.getvalue().strip() == expected  # streamed text = eval's answer (a 2-step model's)


def test_questions_from_a_stream_one_answer_each(run_and_image):
    run_dir, image = run_and_image
    with contextlib.redirect_stdout(io.StringIO()):
        answers = generate_from_args(
            [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"image={image}", "max_new_tokens=4", "device=cpu"],
            questions=["What color is it?\n", "\n", "How many shapes are there?\n"],
        )
    assert answers == [reference(run_dir, image, q, 4) for q in ("What color is it?", "How many shapes are there?")]


def test_an_hf_export_answers_through_plain_transformers(run_and_image, tmp_path):
    from lightning_sp.export import export_hf

    run_dir, image = run_and_image
    export_hf(str(run_dir), str(tmp_path / "hf"))
    with contextlib.redirect_stdout(io.StringIO()):
        answers = generate_from_args(
            [f"ckpt={tmp_path / 'hf'}", f"image={image}", "question=Where is the red circle?", "max_new_tokens=6"]
        )
    assert answers == [reference(run_dir, image, "Where is the red circle?", 6)]


def test_missing_image_is_one_line(run_and_image, capsys):
    run_dir, _ = run_and_image
    with pytest.raises(SystemExit) as exit_:
        main(["generate", f"ckpt={run_dir}", "image=/nope.png", "question=hi"])
    assert exit_.value.code == 2 and "image=/nope.png: no such file" in capsys.readouterr().err
