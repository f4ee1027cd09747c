"""What both frameworks' consensus tests assert about the parameters after ``close()``."""


def assert_parameters_are_the_promised_consensus(result: dict, strategy: str, tolerance: float) -> None:
    """The parameters equal the strategy's consensus (computed by the job from what every rank
    recorded) within ``tolerance``; under an asynchronous strategy or LocalSGD each rank's own
    model was more than twice that away, so keeping or broadcasting one rank's model would fail."""
    assert result["params_error"] <= tolerance, result
    if strategy == "sync":
        assert result["models_identical_before"]
    else:
        assert not result["models_identical_before"]
        assert result["params_spread"] > 2 * tolerance, result
