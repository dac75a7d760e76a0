"""A/B tests between two served models: create, list, results with a significance test, stop, promote."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends

from loralab.api.deps import get_services, require_token
from loralab.services import abtests
from loralab.services.abtests import AbTestRequest
from loralab.services.context import Services

router = APIRouter(prefix="/api/ab-tests", tags=["ab-tests"], dependencies=[Depends(require_token)])


@router.post("", status_code=201)
def create(body: AbTestRequest, svc: Services = Depends(get_services)) -> dict:
    """Start routing `model: "ab:<name>"` to model A or B by the split, sticky per user/session."""
    return abtests.create_test(svc, body)


@router.get("")
def list_tests(status: Literal["active", "stopped"] | None = None, svc: Services = Depends(get_services)) -> list:
    return abtests.list_tests(svc, status)


@router.get("/{test_id}")
def get(test_id: str, svc: Services = Depends(get_services)) -> dict:
    return abtests.get_test(svc, test_id)


@router.get("/{test_id}/results")
def results(test_id: str, svc: Services = Depends(get_services)) -> dict:
    """Per arm: requests, feedback, metric with a 95% interval; p-value, needed sample, winner if significant."""
    return abtests.results(svc, test_id)


@router.post("/{test_id}/stop")
def stop(test_id: str, svc: Services = Depends(get_services)) -> dict:
    """Stop routing; the results (and winner, if any) stay readable."""
    return abtests.stop_test(svc, test_id)


@router.post("/{test_id}/promote")
def promote(test_id: str, svc: Services = Depends(get_services)) -> dict:
    """Set the winning fine-tuned version's stage to production and stop the test (409 without a winner)."""
    return abtests.promote_winner(svc, test_id)
