import pytest
import torch
from pydantic import ValidationError

from serving.bundle import load_bundle
from serving.predictive import regress
from serving.predictor import Predictor
from serving.wire import PredictRequest, PredictResponse, predict_response


@pytest.fixture
def predictor(tmp_path, make_tiny_bundle) -> Predictor:
    return Predictor(load_bundle(make_tiny_bundle().write(tmp_path / "b")))


def test_classification_response_carries_every_field(predictor):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * 3
    prediction = predictor.predict(x, return_members=True)
    response = predict_response(prediction, predictor.bundle)
    assert response.model_name == "tiny" and response.model_version == "1"
    assert response.bundle_sha256 == predictor.bundle.digest
    names = predictor.manifest.class_names
    for i, record in enumerate(response.predictions):
        assert record.label == int(prediction.labels[i])
        assert record.class_name == names[record.label]
        assert record.probabilities == pytest.approx(prediction.probs[i].tolist())
        assert record.mutual_information == pytest.approx(float(prediction.mutual_information[i]))
        expected_set = [names[c] for c in range(3) if prediction.prediction_sets[i, c]]
        assert record.prediction_set == expected_set
        assert record.abstain == bool(prediction.abstain[i])
        assert len(record.member_probabilities) == 4  # 2 simplexes x 2 draws
    # The JSON round trip keeps the record type.
    again = PredictResponse.model_validate_json(response.model_dump_json())
    assert again.predictions[0].class_name == response.predictions[0].class_name


def test_members_are_left_out_unless_asked(predictor):
    response = predict_response(predictor.predict(torch.zeros(2, 4)), predictor.bundle)
    dumped = response.model_dump(exclude_none=True)
    assert "member_probabilities" not in dumped["predictions"][0]


def test_regression_response_has_the_mixture_moments(predictor):
    outputs = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [1.0, 1.0]]])
    prediction = regress(outputs, return_members=True)
    records = predict_response(prediction, predictor.bundle).predictions
    assert records[0].mean == pytest.approx(1.0) and records[1].epistemic == pytest.approx(0.0)
    assert records[0].member_means == [0.0, 2.0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": []}, "inputs"),
        ({"inputs": [[1]], "draws": 0}, "draws"),
        ({"inputs": [[1]], "draws": "2"}, "draws"),  # strict: no string for a number
        ({"inputs": [[1]], "draws": True}, "draws"),
        ({"inputs": [[1]], "return_members": "yes"}, "return_members"),
        ({"inputs": [[1]], "return_members": 1}, "return_members"),
        ({"input": [1]}, "input"),
    ],
)
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(ValidationError, match=field):
        PredictRequest.model_validate(body)
