"""easy-vqa (MIT, `pip install easy-vqa`): 64×64 shape images with questions and 13 one-word answers.

4,000 train / 1,000 test images, 38,575 / 9,673 questions, all shipped inside the package, so it
loads offline. Records follow the reader convention of `vpgtrans.data.readers`.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError

# BLIP-2's VQA prompt; `DataConfig.question_template` uses the same wording.
VQA_PROMPT = "Question: {} Answer:"
SPLITS = ("train", "test")


def _package() -> Any:
    try:
        import easy_vqa
    except ImportError:
        raise DataError("the easy-vqa data set is not installed",
                        "run `pip install easy-vqa` (or `pip install -e .[real]`)") from None
    return easy_vqa


def vqa_prompt(question: str) -> str:
    """The instruction text for one question."""
    return VQA_PROMPT.format(question)


def answers() -> list[str]:
    """The 13 possible answers."""
    return list(_package().get_answers())


def read_easy_vqa(split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Records {image, question, answer, prompt, image_id, where} in the package's order (first `limit`)."""
    if split not in SPLITS:
        raise DataError(f"easy-vqa has no split '{split}'", f"use one of: {', '.join(SPLITS)}")
    pkg = _package()
    questions, answers_, image_ids = pkg.get_train_questions() if split == "train" else pkg.get_test_questions()
    paths = pkg.get_train_image_paths() if split == "train" else pkg.get_test_image_paths()
    records = []
    for i, (question, answer, image_id) in enumerate(zip(questions, answers_, image_ids)):
        if limit is not None and i >= limit:
            break
        if image_id not in paths:
            raise DataError(f"easy-vqa {split} question {i} refers to missing image {image_id}",
                            "reinstall easy-vqa (`pip install --force-reinstall easy-vqa`)")
        records.append({"image": paths[image_id], "question": question, "answer": answer,
                        "prompt": vqa_prompt(question), "image_id": int(image_id), "where": f"easy-vqa {split} #{i}"})
    return records
