"""TLS and mutual TLS between the gateway and the services; plaintext refused where it should be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest

from deploy.demo.media import shape_png
from deploy.processes import start_decoder, start_encoder, start_gateway
from mmserve_core.runtime.tls import ClientTLS
from mmserve_core.wire.stubs import encoder_pb2, encoder_pb2_grpc

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "tls" / "make-certs.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(SCRIPT), str(out), "127.0.0.1", "gateway"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def mtls_services(services_e2b, certs):
    server = ["--tls-cert", str(certs / "127.0.0.1.pem"), "--tls-key", str(certs / "127.0.0.1-key.pem"),
              "--tls-client-ca", str(certs / "ca.pem")]
    client = ClientTLS(str(certs / "ca.pem"), str(certs / "gateway.pem"), str(certs / "gateway-key.pem"))
    creds = client.credentials()
    ckpt = services_e2b.checkpoint
    with start_encoder(ckpt, server, creds) as enc, start_decoder(ckpt, server, creds) as dec:
        yield enc, dec, client


def _info(channel) -> encoder_pb2.GetEncoderInfoResponse:
    return encoder_pb2_grpc.EncoderServiceStub(channel).GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest(), timeout=5)


def test_mtls_refuses_plaintext_and_certificateless_clients(mtls_services, certs):
    enc, _, client = mtls_services
    with grpc.secure_channel(enc.encoder_addr, client.credentials()) as ch:
        assert _info(ch).hidden_size == 64
    with grpc.insecure_channel(enc.encoder_addr) as ch, pytest.raises(grpc.RpcError) as ei:
        _info(ch)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    no_cert = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with grpc.secure_channel(enc.encoder_addr, no_cert) as ch, pytest.raises(grpc.RpcError) as ei:
        _info(ch)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_gateway_over_mtls_serves_media(mtls_services, certs, services_e2b):
    enc, dec, _ = mtls_services
    args = ["--upstream-ca", str(certs / "ca.pem"), "--upstream-cert", str(certs / "gateway.pem"),
            "--upstream-key", str(certs / "gateway-key.pem")]
    import base64

    img = base64.b64encode(shape_png(size=(40, 40))).decode()
    with start_gateway(services_e2b.checkpoint, enc.encoder_addr, dec.decoder_addr, args) as gw:
        r = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.gateway_port}/v1", api_key="x").chat.completions.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}", "detail": "low"}}]}])
        assert r.usage.prompt_tokens_details.soft_tokens > 0
    with start_gateway(services_e2b.checkpoint, enc.encoder_addr, dec.decoder_addr) as plain_gw:  # no client TLS
        with pytest.raises(openai.APIStatusError) as ei:
            openai.OpenAI(base_url=f"http://127.0.0.1:{plain_gw.gateway_port}/v1", api_key="x",
                          max_retries=0).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 503


@pytest.mark.parametrize("module", ["encoder_service", "decoder_service", "gateway"])
def test_plaintext_on_a_public_address_must_be_asked_for(services_e2b, module):
    r = subprocess.run([sys.executable, "-m", module, "--checkpoint", services_e2b.checkpoint,
                        "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "refusing to serve plaintext on 0.0.0.0" in r.stderr
