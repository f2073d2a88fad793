"""A plain FastAPI JSON route (not cmim's) serving an ONNX classifier, with the failures a remote suspect
can show; run by the tests with cmim's own environment:

    python json_route.py PORT MODEL.onnx

POST /predict {"instances": [...]} -> {"predictions": [label, ...]}; every request's rows are counted
(GET /count). POST /mode {"mode": ...} switches behaviour: ok, error (500), shape (a wrong answer),
stall (never answers), busy (503 on every other request, with Retry-After 0)."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()
state = {"mode": "ok", "rows": 0, "requests": 0}


@app.post("/predict")
async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    x = np.asarray(body["instances"], dtype=np.float32)
    state["rows"] += len(x)
    state["requests"] += 1
    mode = state["mode"]
    if mode == "error":
        return JSONResponse({"error": "boom"}, status_code=500)
    if mode == "stall":
        await asyncio.sleep(3600)
    if mode == "busy" and state["requests"] % 2 == 1:
        return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": "0"})
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    labels = logits.argmax(-1).tolist()
    if mode == "shape":
        return JSONResponse({"predictions": labels[:-1]})
    return JSONResponse({"predictions": labels})


@app.post("/mode")
async def set_mode(request: Request) -> dict:
    state["mode"] = (await request.json())["mode"]
    return state


@app.get("/count")
async def count() -> dict:
    return state


if __name__ == "__main__":
    session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
