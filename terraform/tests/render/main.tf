# Renders the cell's and the router's templates with sample values, the way
# modules/cell and modules/router call them. scripts/check-terraform applies
# this root (no providers, no cloud) in a scratch copy of terraform/ and hands
# `terraform output -json` to tests/templates.py.

locals {
  cell_templates   = "${path.module}/../../modules/cell/templates"
  router_templates = "${path.module}/../../modules/router/templates"
  feed_templates   = "${path.module}/../../modules/feed/templates"

  relay_vars = {
    cell_id        = "eu-a"
    region         = "eu-west-1"
    jurisdiction   = "eu"
    quic_port      = 4433
    gossip_port    = 7946
    metrics_port   = 9090
    gateway_port   = 8080
    api_port       = 8090
    data_dir       = "/var/lib/meridian"
    durable_table  = "meridian-changes-eu"
    durable_bucket = "meridian-snapshots-eu-eu-west-1"
    control_table  = "meridian-control"
    seeds          = "@SEEDS@"
    tenants = [
      { id = "acme", public_keys = ["k4.public.AAAA", "k4.public.BBBB"] },
      { id = "quote\"tenant", public_keys = [] },
    ]
  }

  relay_config = templatefile("${local.cell_templates}/relay.toml.tftpl", local.relay_vars)

  relay_config_static_seeds = templatefile("${local.cell_templates}/relay.toml.tftpl", merge(local.relay_vars, {
    seeds   = jsonencode(["10.0.1.10:7946", "10.0.2.10:7946"])
    tenants = []
  }))

  router_config = templatefile("${local.router_templates}/router.toml.tftpl", {
    quic_port        = 4433
    metrics_port     = 9090
    locate_http_port = 8081
    locate_origins   = ["https://app.example"]
    jurisdictions = {
      eu = ["eu-west-1", "eu-central-1"]
      us = ["us-east-1"]
    }
    cells = [
      { id = "eu-a", region = "eu-west-1", jurisdiction = "eu", weight = 2, endpoint = "eu-a.elb.example:4433", admin = "eu-a.elb.example:9090", gateway = "wss://eu-a.elb.example:443/" },
      { id = "us-a", region = "us-east-1", jurisdiction = "us", weight = 1, endpoint = "us-a.elb.example:4433", admin = "us-a.elb.example:9090", gateway = "wss://us-a.elb.example:443/" },
    ]
    control_tables = {
      eu = { region = "eu-west-1", table = "meridian-control", kms_key_arn = "arn:aws:kms:eu-west-1:111122223333:key/x" }
      us = { region = "us-east-1", table = "meridian-control", kms_key_arn = "arn:aws:kms:us-east-1:111122223333:key/y" }
    }
  })

  feed_config = templatefile("${local.feed_templates}/feed.toml.tftpl", {
    feed_id          = "main"
    jurisdiction     = "eu"
    lease_ms         = 30000
    poll_interval_ms = 500
    durable_table    = "meridian-changes-eu"
    durable_bucket   = "meridian-snapshots-eu-eu-west-1"
    region           = "eu-west-1"
    metrics_port     = 9102
    control_table    = "meridian-control"
    control_region   = "eu-west-1"
    webhooks = [
      { tenant = "acme", url = "https://hooks.acme.example/meridian", allowed_hosts = ["hooks.acme.example"], allow_private = false, secret_arn = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:acme-hook-AbCdEf" },
    ]
  })

  user_data_vars = {
    service            = "relay"
    region             = "eu-west-1"
    cell_id            = "eu-a"
    data_dir           = "/var/lib/meridian"
    data_volume        = "nvme"
    quic_port          = 4433
    gossip_port        = 7946
    metrics_port       = 9090
    binary_url         = "s3://artifacts/meridian"
    binary_sha256      = "0000000000000000000000000000000000000000000000000000000000000000"
    gossip_secret_arn  = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:meridian-eu-a-gossip-AbCdEf"
    tls_secret_arn     = ""
    advertise_public   = true
    discover_seeds     = true
    config_b64         = base64encode(local.relay_config)
    cwagent_config_b64 = base64encode("{}")
    secret_files       = {}
  }
}

output "relay_config" {
  value = local.relay_config
}

output "relay_config_static_seeds" {
  value = local.relay_config_static_seeds
}

output "router_config" {
  value = local.router_config
}

output "cell_user_data_nvme" {
  value = templatefile("${local.cell_templates}/user-data.sh.tftpl", local.user_data_vars)
}

output "cell_user_data_gp3" {
  value = templatefile("${local.cell_templates}/user-data.sh.tftpl", merge(local.user_data_vars, {
    data_volume      = "gp3"
    tls_secret_arn   = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:tls-AbCdEf"
    advertise_public = false
    discover_seeds   = false
  }))
}

output "router_user_data" {
  value = templatefile("${local.cell_templates}/user-data.sh.tftpl", merge(local.user_data_vars, {
    service            = "router"
    cell_id            = ""
    data_volume        = "none"
    gossip_port        = 0
    gossip_secret_arn  = ""
    discover_seeds     = false
    config_b64         = base64encode(local.router_config)
    cwagent_config_b64 = ""
    secret_files       = {}
  }))
}

output "feed_config" {
  value = local.feed_config
}

output "feed_user_data" {
  value = templatefile("${local.cell_templates}/user-data.sh.tftpl", merge(local.user_data_vars, {
    service            = "feed"
    cell_id            = ""
    data_volume        = "none"
    quic_port          = 0
    gossip_port        = 0
    metrics_port       = 9102
    gossip_secret_arn  = ""
    advertise_public   = false
    discover_seeds     = false
    config_b64         = base64encode(local.feed_config)
    cwagent_config_b64 = ""
    secret_files       = { "/etc/meridian/webhooks/acme.secrets" = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:acme-hook-AbCdEf" }
  }))
}
