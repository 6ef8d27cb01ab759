#!/usr/bin/env python3
"""Checks of the relay/router configuration templates and the boot script.

  templates.py static
      Reads modules/cell/templates/relay.toml.tftpl as text and checks that it
      renders exactly the relay configuration keys the relay binary reads.

  templates.py rendered OUTPUTS_JSON
      Checks the outputs of tests/render (`terraform output -json`): every
      rendered relay.toml and router.toml parses as TOML once the boot-time
      placeholders are filled in, has exactly the expected keys and values, and
      every rendered boot script passes `bash -n`, runs the right command and
      embeds the same configuration.

Exit status 0 when all checks pass, 1 otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
RELAY_TEMPLATE = os.path.join(HERE, "..", "modules", "cell", "templates", "relay.toml.tftpl")

# The relay configuration keys (relay's TOML model). [durable] endpoint is an
# optional override for emulators and is never rendered for AWS.
RELAY_KEYS = {
    "node": {"id", "cell", "region", "jurisdiction", "listen", "advertise", "data_dir"},
    "tls": {"cert_file", "key_file"},
    "durable": {"kind", "table", "bucket", "region"},
    "cell": {"gossip_listen", "gossip_advertise", "seeds", "key_file"},
    "metrics": {"listen"},
    "gateway": {"listen"},
    "api": {"listen"},
    "placement": {"refresh_ms", "control"},
}
TENANT_KEYS = {"id", "public_keys"}

failures: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        failures.append(message)


def static() -> None:
    sections: dict[str, set[str]] = {}
    current = None
    with open(RELAY_TEMPLATE, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith(("#", "%{")):
                continue
            header = re.fullmatch(r"\[\[?([a-z_.]+)\]\]?", line)
            if header:
                current = header.group(1)
                sections.setdefault(current, set())
                continue
            key = re.match(r"([a-z_]+) = ", line)
            check(key is not None and current is not None, f"relay.toml.tftpl: unexpected line {line!r}")
            if key and current:
                sections[current].add(key.group(1))
    expected = dict(RELAY_KEYS, tenants=TENANT_KEYS)
    check(sections == expected, f"relay.toml.tftpl keys {sections} != expected {expected}")


def fill(config: str, seeds: str = '["10.0.1.11:7946"]') -> str:
    """What the boot script's sed does."""
    return (
        config.replace("@NODE_ID@", "i-0123456789abcdef0")
        .replace("@ADVERTISE@", "203.0.113.7:4433")
        .replace("@GOSSIP_ADVERTISE@", "10.0.1.10:7946")
        .replace("@SEEDS@", seeds)
    )


def relay(config: str, name: str, expect_seeds: list[str], expect_tenants: list[dict]) -> None:
    try:
        doc = tomllib.loads(fill(config))
    except tomllib.TOMLDecodeError as err:
        failures.append(f"{name}: not TOML: {err}")
        return
    for section, keys in RELAY_KEYS.items():
        check(set(doc.get(section, {})) == keys, f"{name}: [{section}] keys {set(doc.get(section, {}))} != {keys}")
    check(set(doc) - {"tenants"} == set(RELAY_KEYS), f"{name}: sections {set(doc)}")
    node, durable, gossip = doc.get("node", {}), doc.get("durable", {}), doc.get("cell", {})
    check(node.get("id") == "i-0123456789abcdef0", f"{name}: node.id {node.get('id')!r}")
    check(node.get("cell") == "eu-a" and node.get("region") == "eu-west-1", f"{name}: node {node}")
    check(node.get("jurisdiction") == "eu", f"{name}: node.jurisdiction {node.get('jurisdiction')!r}")
    check(node.get("listen") == "0.0.0.0:4433", f"{name}: node.listen {node.get('listen')!r}")
    check(node.get("advertise") == "203.0.113.7:4433", f"{name}: node.advertise {node.get('advertise')!r}")
    check(node.get("data_dir") == "/var/lib/meridian", f"{name}: node.data_dir {node.get('data_dir')!r}")
    check(
        durable == {
            "kind": "dynamodb",
            "table": "meridian-changes-eu",
            "bucket": "meridian-snapshots-eu-eu-west-1",
            "region": "eu-west-1",
        },
        f"{name}: durable {durable}",
    )
    check(gossip.get("gossip_listen") == "0.0.0.0:7946", f"{name}: cell.gossip_listen {gossip.get('gossip_listen')!r}")
    check(gossip.get("gossip_advertise") == "10.0.1.10:7946", f"{name}: cell.gossip_advertise {gossip.get('gossip_advertise')!r}")
    check(gossip.get("seeds") == expect_seeds, f"{name}: cell.seeds {gossip.get('seeds')!r} != {expect_seeds}")
    check(gossip.get("key_file") == "/etc/meridian/gossip.key", f"{name}: cell.key_file")
    check(doc.get("tls") == {"cert_file": "/etc/meridian/tls/node.crt", "key_file": "/etc/meridian/tls/node.key"}, f"{name}: tls")
    check(doc.get("metrics") == {"listen": "0.0.0.0:9090"}, f"{name}: metrics {doc.get('metrics')}")
    check(
        doc.get("placement")
        == {"refresh_ms": 1000, "control": {"kind": "dynamodb", "table": "meridian-control", "region": "eu-west-1"}},
        f"{name}: placement {doc.get('placement')}",
    )
    check(doc.get("tenants", []) == expect_tenants, f"{name}: tenants {doc.get('tenants')} != {expect_tenants}")


def router(config: str) -> None:
    try:
        doc = tomllib.loads(fill(config))
    except tomllib.TOMLDecodeError as err:
        failures.append(f"router_config: not TOML: {err}")
        return
    check(
        set(doc) == {"router", "tls", "control", "metrics", "jurisdictions", "cells"},
        f"router_config: sections {set(doc)}",
    )
    check(
        doc.get("router") == {"listen": "0.0.0.0:4433", "http_listen": "0.0.0.0:8081", "http_origins": ["https://app.example"]},
        f"router_config: [router] {doc.get('router')}",
    )
    check(
        doc.get("jurisdictions") == {"eu": ["eu-west-1", "eu-central-1"], "us": ["us-east-1"]},
        f"router_config: jurisdictions {doc.get('jurisdictions')}",
    )
    check(
        doc.get("cells")
        == [
            {"id": "eu-a", "region": "eu-west-1", "jurisdiction": "eu", "weight": 2,
             "nodes": [{"id": "eu-a-lb", "endpoint": "eu-a.elb.example:4433", "admin": "eu-a.elb.example:9090"}],
             "gateway": "wss://eu-a.elb.example:443/"},
            {"id": "us-a", "region": "us-east-1", "jurisdiction": "us", "weight": 1,
             "nodes": [{"id": "us-a-lb", "endpoint": "us-a.elb.example:4433", "admin": "us-a.elb.example:9090"}],
             "gateway": "wss://us-a.elb.example:443/"},
        ],
        f"router_config: cells {doc.get('cells')}",
    )
    control = doc.get("control", {})
    check(control.get("kind") == "dynamodb", f"router_config: control.kind {control.get('kind')!r}")
    check(
        control.get("jurisdictions")
        == {
            "eu": {"table": "meridian-control", "region": "eu-west-1"},
            "us": {"table": "meridian-control", "region": "us-east-1"},
        },
        f"router_config: control.jurisdictions {control.get('jurisdictions')}",
    )


def feed(config: str) -> None:
    try:
        doc = tomllib.loads(config)
    except tomllib.TOMLDecodeError as err:
        failures.append(f"feed_config: not TOML: {err}")
        return
    check(set(doc) == {"feed", "durable", "metrics", "control", "webhooks"}, f"feed_config: sections {set(doc)}")
    check(
        doc.get("durable") == {"kind": "dynamodb", "table": "meridian-changes-eu",
                               "bucket": "meridian-snapshots-eu-eu-west-1", "region": "eu-west-1"},
        f"feed_config: [durable] {doc.get('durable')}",
    )
    check(
        doc.get("webhooks") == [{"tenant": "acme", "url": "https://hooks.acme.example/meridian",
                                 "secrets_file": "/etc/meridian/webhooks/acme.secrets",
                                 "allowed_hosts": ["hooks.acme.example"], "allow_private": False}],
        f"feed_config: webhooks {doc.get('webhooks')}",
    )
    check("secret" not in json.dumps(doc.get("feed")), "feed_config: a secret in [feed]")


def boot_script(script: str, name: str, service: str, config: str, features: dict[str, bool]) -> None:
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    check(result.returncode == 0, f"{name}: bash -n: {result.stderr.strip()}")
    check(script.startswith("#!/bin/bash\n"), f"{name}: no shebang")
    check(
        f"ExecStart=/usr/local/bin/meridian {service} --config /etc/meridian/{service}.toml" in script,
        f"{name}: does not run `meridian {service} --config /etc/meridian/{service}.toml`",
    )
    check("systemctl enable --now" in script, f"{name}: service not enabled")
    check("sha256sum -c" in script, f"{name}: binary checksum not verified")
    embedded = re.search(r"echo '([A-Za-z0-9+/=]+)' \| base64 -d \|\n", script)
    check(embedded is not None and base64.b64decode(embedded.group(1)).decode() == config, f"{name}: embedded config differs")
    for marker, present in features.items():
        check((marker in script) == present, f"{name}: {marker!r} {'missing' if present else 'unexpected'}")
    check(len(base64.b64encode(script.encode())) <= 16384, f"{name}: user data over 16 KiB")


def rendered(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        outputs = {k: v["value"] for k, v in json.load(handle).items()}
    tenants = [
        {"id": "acme", "public_keys": ["k4.public.AAAA", "k4.public.BBBB"]},
        {"id": 'quote"tenant', "public_keys": []},
    ]
    relay(outputs["relay_config"], "relay_config", ["10.0.1.11:7946"], tenants)
    relay(outputs["relay_config_static_seeds"], "relay_config_static_seeds", ["10.0.1.10:7946", "10.0.2.10:7946"], [])
    router(outputs["router_config"])
    boot_script(
        outputs["cell_user_data_nvme"], "cell_user_data_nvme", "relay", outputs["relay_config"],
        {"Instance Storage": True, "Elastic Block Store": False, "gossip.key": True, "describe-instances": True,
         "openssl req": True, "amazon-cloudwatch-agent-ctl": True},
    )
    boot_script(
        outputs["cell_user_data_gp3"], "cell_user_data_gp3", "relay", outputs["relay_config"],
        {"Instance Storage": False, "Elastic Block Store": True, "gossip.key": True, "describe-instances": False,
         "openssl req": False, "jq -er .cert": True},
    )
    boot_script(
        outputs["router_user_data"], "router_user_data", "router", outputs["router_config"],
        {"mkfs.xfs": False, "gossip.key": False, "describe-instances": False, "amazon-cloudwatch-agent-ctl": False,
         "/etc/meridian/webhooks/": False},
    )
    feed(outputs["feed_config"])
    boot_script(
        outputs["feed_user_data"], "feed_user_data", "feed", outputs["feed_config"],
        {"mkfs.xfs": False, "gossip.key": False, "describe-instances": False,
         'secret "arn:aws:secretsmanager:eu-west-1:111122223333:secret:acme-hook-AbCdEf" > "/etc/meridian/webhooks/acme.secrets"': True},
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["static"] and len(argv) == 1:
        static()
    elif argv[:1] == ["rendered"] and len(argv) == 2:
        rendered(argv[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for failure in failures:
        print(f"  FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
