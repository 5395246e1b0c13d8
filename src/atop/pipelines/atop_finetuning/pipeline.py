"""AToP fine-tuning: the pretrained purifier, fine-tuned adversarially (paper Eq. 9)."""

from kedro.pipeline import Node, Pipeline

from atop.pipelines.atop_finetuning.nodes import finetune_purifier


def create_pipeline(**kwargs) -> Pipeline:
    """The ``atop_finetuning`` pipeline: ``classifier`` + ``purifier`` -> ``atop_purifier``.

    The fine-tuned purifier is written beside (not over) the pretrained one, so the
    evaluation compares the purifier without AToP ("AP") and with it ("AToP").
    """
    return Pipeline(
        [
            Node(
                finetune_purifier,
                inputs=[
                    "classifier",
                    "purifier",
                    "train_set",
                    "class_names",
                    "params:atop_finetuning",
                ],
                outputs=["atop_purifier", "atop_history", "atop_metrics"],
                name="finetune_purifier",
            )
        ]
    )
