"""The protobuf half of the Tinker wire, for :mod:`tests.fakes.fake_tinker`.

The ``tinker`` SDK (0.38.0) sends ``/api/v1/forward_backward`` as a protobuf
``ForwardBackwardRequest`` (``Content-Type: application/x-protobuf``, zstd-compressed with
``Content-Encoding: zstd`` when the server's client config says so), and it accepts a
``ForwardBackwardOutput`` or a ``SampleResponse`` from ``/api/v1/retrieve_future`` *only* as
protobuf: a JSON payload for those two types is an error in this SDK version. Everything else on the
wire is JSON. The message classes come from the SDK's own generated module, so the fake reads and
writes exactly the bytes the real service does; the field layouts (token ids as int32 bytes, tensors
as dense bytes plus dtype and shape, per-datum outputs as one ``ArrayRecord`` of batched tensors
with byte offsets) follow ``tinker/proto/request_conv.py`` and ``response_conv.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard
from tinker.proto import tinker_public_pb2 as pb

#: the proto dtypes the SDK writes for ``TensorData`` (float32 and int64 on the public wire)
_NUMPY_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


class WireError(ValueError):
    """A request the fake cannot read; the route answers it as the real service would a bad body."""


@dataclass(frozen=True)
class WireDatum:
    """One ``Datum`` of a forward_backward request, as it arrived."""

    tokens: tuple[int, ...]  #: ``model_input`` token ids, all encoded-text chunks joined
    chunks: int  #: how many model-input chunks carried them
    loss_fn_inputs: dict[str, np.ndarray]  #: each input as a dense numpy array of its shape


@dataclass(frozen=True)
class WireForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    forward_only: bool
    loss_fn_config: dict[str, float | str]
    data: tuple[WireDatum, ...]


def _tensor(msg: pb.Tensor, name: str) -> np.ndarray:
    dtype = _NUMPY_DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"loss_fn_inputs[{name!r}]: unsupported dtype {msg.dtype}")
    if msg.WhichOneof("encoding") != "dense":
        # The SDK writes sparse CSR only for 2-D torch tensors; no cross_entropy input needs one.
        raise WireError(f"loss_fn_inputs[{name!r}]: the fake reads dense tensors only")
    array = np.frombuffer(msg.dense, dtype=dtype)
    shape = list(msg.shape) or [array.size]
    if math.prod(shape) != array.size:
        raise WireError(f"loss_fn_inputs[{name!r}]: shape {shape} does not match {array.size} values")
    return array.reshape(shape).copy()


def decode_forward_backward(body: bytes, content_encoding: str | None) -> WireForwardBackward:
    """Parse a forward_backward body (optionally zstd) into plain Python values."""
    if (content_encoding or "").lower() == "zstd":
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises its own DecodeError
        raise WireError(f"forward_backward: body is not a ForwardBackwardRequest ({e})") from e
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, value in msg.loss_fn_config_v2.items():
        config[k] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    data = []
    for datum in msg.data:
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise WireError("forward_backward: the fake reads encoded-text chunks only")
            tokens.extend(int(t) for t in np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32))
        inputs = {name: _tensor(t, name) for name, t in datum.loss_fn_inputs.items()}
        data.append(WireDatum(tuple(tokens), len(datum.model_input), inputs))
    return WireForwardBackward(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        forward_only=bool(msg.forward_only),
        loss_fn_config=config,
        data=tuple(data),
    )


def _batched(arrays: Sequence[np.ndarray]) -> pb.BatchedTensor:
    """Per-datum float32 vectors as one ``BatchedTensor`` (byte offsets, as the SDK slices them)."""
    parts = [np.asarray(a, dtype=np.float32).ravel() for a in arrays]
    offsets = np.cumsum([0] + [p.nbytes for p in parts], dtype=np.int64)
    data = np.concatenate(parts).tobytes() if parts else b""
    return pb.BatchedTensor(data=data, offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32)


def encode_forward_backward_output(outputs: Sequence[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """A ``ForwardBackwardOutput``: one ``ArrayRecord`` whose fields hold every datum's outputs."""
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(outputs))
    for name in outputs[0] if outputs else ():
        record.fields[name].CopyFrom(_batched([o[name] for o in outputs]))
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=metrics)
    msg.loss_fn_outputs.append(record)
    return bytes(msg.SerializeToString())


@dataclass(frozen=True)
class WireSequence:
    tokens: Sequence[int]
    logprobs: Sequence[float]
    stopped: bool  #: True: ``stop_reason="stop"``; False: ``"length"``


def encode_sample_response(sequences: Sequence[WireSequence], prompt_logprobs: Sequence[float | None] | None) -> bytes:
    """A ``SampleResponse``; a ``None`` prompt logprob goes out as NaN (the SDK reads it as None)."""
    msg = pb.SampleResponse()
    for seq in sequences:
        msg.sequences.append(
            pb.SampledSequence(
                stop_reason=pb.STOP_REASON_STOP if seq.stopped else pb.STOP_REASON_LENGTH,
                tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes(),
                logprobs=np.asarray(seq.logprobs, dtype=np.float32).tobytes(),
            )
        )
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return bytes(msg.SerializeToString())
