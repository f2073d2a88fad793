"""A KServe `ModelServer` (the kserve SDK, not cmim) serving ONNX classifiers over the Open Inference
Protocol v2; run by the tests in the servers' own environment (`make servers`):

    python kserve_onnx.py --http_port PORT --serve NAME=MODEL.onnx [...] --count_file FILE

Each request's rows are appended to the count file (one line per request, `NAME ROWS`): the server's
own count of the queries it received."""

from __future__ import annotations

import argparse
import uuid

import numpy as np
import onnxruntime as ort
from kserve import Model, ModelServer, model_server
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse


class OnnxClassifier(Model):
    """One ONNX file; answers the logits of its first output for the first input tensor."""

    def __init__(self, name: str, path: str, count_file: str) -> None:
        super().__init__(name)
        self.path, self.count_file = path, count_file
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict | None = None,
    ) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32)
        with open(self.count_file, "a") as f:
            f.write(f"{self.name} {len(x)}\n")
        (logits,) = self.session.run(None, {self.session.get_inputs()[0].name: x})
        out = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
        out.set_data_from_numpy(np.ascontiguousarray(logits, dtype=np.float32), binary_data=False)
        # a v2 request's id is optional; kserve's response needs one
        rid = payload.id or str(uuid.uuid4())
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=rid)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--serve", action="append", required=True, help="NAME=MODEL.onnx")
    parser.add_argument("--count_file", required=True)
    args, _ = parser.parse_known_args()
    models = [OnnxClassifier(*s.split("=", 1), args.count_file) for s in args.serve]
    ModelServer(http_port=args.http_port, enable_grpc=False, workers=1).start(models)
