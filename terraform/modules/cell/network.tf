# Security groups and the Network Load Balancer.
#
# node:   QUIC (UDP) from client_cidrs and between the cell's nodes; metrics
#         (TCP) from metrics_cidr and from the load balancer (health checks);
#         HTTPS out to AWS APIs.
# gossip: SWIM (UDP) only between members of this group, i.e. this cell's nodes.
# nlb:    QUIC and the gateway's and the API's TLS in from client_cidrs; out only to the
#         nodes.

resource "aws_security_group" "node" {
  name_prefix = "${local.name}-node-"
  description = "Meridian cell ${var.cell_id} relay nodes"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${local.name}-node" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "quic" {
  for_each = toset(var.client_cidrs)

  security_group_id = aws_security_group.node.id
  description       = "QUIC from clients (client IPs are preserved through the NLB)"
  ip_protocol       = "udp"
  from_port         = var.quic_port
  to_port           = var.quic_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "gateway" {
  security_group_id            = aws_security_group.node.id
  description                  = "WebSocket gateway from the load balancer's TLS listener"
  ip_protocol                  = "tcp"
  from_port                    = var.gateway_port
  to_port                      = var.gateway_port
  referenced_security_group_id = module.lb.security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "gateway_peers" {
  security_group_id            = aws_security_group.node.id
  description                  = "WebSocket gateway between relay nodes of the cell (documents another node owns)"
  ip_protocol                  = "tcp"
  from_port                    = var.gateway_port
  to_port                      = var.gateway_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_vpc_security_group_egress_rule" "gateway_peers" {
  security_group_id            = aws_security_group.node.id
  description                  = "WebSocket gateway of the cell's other relay nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.gateway_port
  to_port                      = var.gateway_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_vpc_security_group_ingress_rule" "api" {
  security_group_id            = aws_security_group.node.id
  description                  = "HTTP API from the load balancer's TLS listener"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = module.lb.security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "api_peers" {
  security_group_id            = aws_security_group.node.id
  description                  = "HTTP API between relay nodes of the cell (requests for documents another node owns)"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_vpc_security_group_egress_rule" "api_peers" {
  security_group_id            = aws_security_group.node.id
  description                  = "HTTP API of the cell's other relay nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  security_group_id = aws_security_group.node.id
  description       = "Prometheus metrics from the monitoring network"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = var.metrics_cidr
}

resource "aws_vpc_security_group_ingress_rule" "health" {
  security_group_id            = aws_security_group.node.id
  description                  = "NLB health checks on /healthz"
  ip_protocol                  = "tcp"
  from_port                    = var.metrics_port
  to_port                      = var.metrics_port
  referenced_security_group_id = module.lb.security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "quic_peers" {
  security_group_id            = aws_security_group.node.id
  description                  = "QUIC between relay nodes of the cell (relay-to-relay messages)"
  ip_protocol                  = "udp"
  from_port                    = var.quic_port
  to_port                      = var.quic_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_vpc_security_group_egress_rule" "quic_peers" {
  security_group_id            = aws_security_group.node.id
  description                  = "QUIC to relay nodes of the cell"
  ip_protocol                  = "udp"
  from_port                    = var.quic_port
  to_port                      = var.quic_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.node.id
  description       = "HTTPS to AWS APIs (DynamoDB, S3, KMS, Secrets Manager, CloudWatch) and the binary"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_security_group" "gossip" {
  name_prefix = "${local.name}-gossip-"
  description = "Meridian cell ${var.cell_id} SWIM gossip between its own nodes"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${local.name}-gossip" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "gossip" {
  security_group_id            = aws_security_group.gossip.id
  description                  = "SWIM gossip from nodes of the same cell"
  ip_protocol                  = "udp"
  from_port                    = var.gossip_port
  to_port                      = var.gossip_port
  referenced_security_group_id = aws_security_group.gossip.id
}

resource "aws_vpc_security_group_egress_rule" "gossip" {
  security_group_id            = aws_security_group.gossip.id
  description                  = "SWIM gossip to nodes of the same cell"
  ip_protocol                  = "udp"
  from_port                    = var.gossip_port
  to_port                      = var.gossip_port
  referenced_security_group_id = aws_security_group.gossip.id
}

# Routers probe the cell's readiness through the load balancer: a TCP listener on
# the metrics port, reachable only from router_cidrs, forwarding to the nodes'
# /readyz (a cell is ready while one node is).
resource "aws_vpc_security_group_ingress_rule" "nlb_probe" {
  for_each = toset(var.router_cidrs)

  security_group_id = module.lb.security_group_id
  description       = "Readiness probes from the routers"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = each.value
}

resource "aws_lb_target_group" "probe" {
  name_prefix          = "mrp-"
  port                 = var.metrics_port
  protocol             = "TCP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = 10
  tags                 = local.tags

  health_check {
    protocol            = "HTTP"
    port                = tostring(var.metrics_port)
    path                = "/readyz"
    matcher             = "200"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "probe" {
  load_balancer_arn = module.lb.arn
  port              = var.metrics_port
  protocol          = "TCP"
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.probe.arn
  }
}

# The WebSocket gateway over TLS (wss): browsers cannot speak QUIC to the relay, so the
# load balancer also terminates TLS on gateway_tls_port and forwards plain TCP to the
# nodes' gateways.
module "gateway_tls" {
  source = "../tls-listener"

  name_prefix                     = "mrw-"
  what                            = "wss:// to the WebSocket gateways"
  vpc_id                          = var.vpc_id
  load_balancer_arn               = module.lb.arn
  load_balancer_security_group_id = module.lb.security_group_id
  target_security_group_id        = aws_security_group.node.id
  client_cidrs                    = var.client_cidrs
  tls_port                        = var.gateway_tls_port
  target_port                     = var.gateway_port
  certificate_arn                 = var.gateway_certificate_arn
  health_port                     = var.metrics_port
  deregistration_delay            = 60
  tags                            = local.tags
}

# The HTTP API over TLS (https) for backends, the same way, with the gateway's
# certificate.
module "api_tls" {
  source = "../tls-listener"

  name_prefix                     = "mra-"
  what                            = "https:// to the HTTP API"
  vpc_id                          = var.vpc_id
  load_balancer_arn               = module.lb.arn
  load_balancer_security_group_id = module.lb.security_group_id
  target_security_group_id        = aws_security_group.node.id
  client_cidrs                    = var.client_cidrs
  tls_port                        = var.api_tls_port
  target_port                     = var.api_port
  certificate_arn                 = var.gateway_certificate_arn
  health_port                     = var.metrics_port
  deregistration_delay            = 60
  tags                            = local.tags
}

# Deployments made before the gateway's listener moved into modules/tls-listener keep it.
moved {
  from = aws_vpc_security_group_ingress_rule.nlb_gateway
  to   = module.gateway_tls.aws_vpc_security_group_ingress_rule.clients
}

moved {
  from = aws_vpc_security_group_egress_rule.nlb_gateway
  to   = module.gateway_tls.aws_vpc_security_group_egress_rule.targets
}

moved {
  from = aws_lb_target_group.gateway
  to   = module.gateway_tls.aws_lb_target_group.this
}

moved {
  from = aws_lb_listener.gateway
  to   = module.gateway_tls.aws_lb_listener.this
}

module "lb" {
  source = "../quic-lb"

  name                     = local.name
  description              = "Meridian cell ${var.cell_id} load balancer"
  role                     = "relay nodes"
  target_group_prefix      = "mrd-"
  vpc_id                   = var.vpc_id
  subnet_ids               = var.subnet_ids
  client_cidrs             = var.client_cidrs
  target_security_group_id = aws_security_group.node.id
  quic_port                = var.quic_port
  metrics_port             = var.metrics_port
  deregistration_delay     = 60
  deletion_protection      = var.deletion_protection
  tags                     = local.tags
}

# The load balancer moved into modules/quic-lb; these keep existing deployments in place.
moved {
  from = aws_security_group.nlb
  to   = module.lb.aws_security_group.nlb
}

moved {
  from = aws_vpc_security_group_ingress_rule.nlb_quic
  to   = module.lb.aws_vpc_security_group_ingress_rule.nlb_quic
}

moved {
  from = aws_vpc_security_group_egress_rule.nlb_quic
  to   = module.lb.aws_vpc_security_group_egress_rule.nlb_quic
}

moved {
  from = aws_vpc_security_group_egress_rule.nlb_health
  to   = module.lb.aws_vpc_security_group_egress_rule.nlb_health
}

moved {
  from = aws_lb.this
  to   = module.lb.aws_lb.this
}

moved {
  from = aws_lb_target_group.quic
  to   = module.lb.aws_lb_target_group.quic
}

moved {
  from = aws_lb_listener.quic
  to   = module.lb.aws_lb_listener.quic
}
