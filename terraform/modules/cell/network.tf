# Security groups and the Network Load Balancer.
#
# node:   QUIC (UDP) from client_cidrs and between the cell's nodes; metrics
#         (TCP) from metrics_cidr and from the load balancer (health checks);
#         HTTPS out to AWS APIs.
# gossip: SWIM (UDP) only between members of this group, i.e. this cell's nodes.
# nlb:    QUIC in from client_cidrs; out only to the nodes.

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
  referenced_security_group_id = aws_security_group.nlb.id
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

resource "aws_security_group" "nlb" {
  name_prefix = "${local.name}-nlb-"
  description = "Meridian cell ${var.cell_id} load balancer"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${local.name}-nlb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "nlb_quic" {
  for_each = toset(var.client_cidrs)

  security_group_id = aws_security_group.nlb.id
  description       = "QUIC from clients"
  ip_protocol       = "udp"
  from_port         = var.quic_port
  to_port           = var.quic_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "nlb_quic" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "QUIC to the relay nodes"
  ip_protocol                  = "udp"
  from_port                    = var.quic_port
  to_port                      = var.quic_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_vpc_security_group_egress_rule" "nlb_health" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Health checks to the relay nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.metrics_port
  to_port                      = var.metrics_port
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_lb" "this" {
  name                             = substr("${local.name}-nlb", 0, 32)
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = var.subnet_ids
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = local.tags
}

resource "aws_lb_target_group" "quic" {
  name_prefix          = "mrd-"
  port                 = var.quic_port
  protocol             = "UDP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = 60
  tags                 = local.tags

  health_check {
    protocol            = "HTTP"
    port                = tostring(var.metrics_port)
    path                = "/healthz"
    matcher             = "200"
    interval            = 10
    healthy_threshold   = 3
    unhealthy_threshold = 3
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "quic" {
  load_balancer_arn = aws_lb.this.arn
  port              = var.quic_port
  protocol          = "UDP"
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.quic.arn
  }
}

# Routers probe the cell's readiness through the load balancer: a TCP listener on
# the metrics port, reachable only from router_cidrs, forwarding to the nodes'
# /readyz (a cell is ready while one node is).
resource "aws_vpc_security_group_ingress_rule" "nlb_probe" {
  for_each = toset(var.router_cidrs)

  security_group_id = aws_security_group.nlb.id
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
  load_balancer_arn = aws_lb.this.arn
  port              = var.metrics_port
  protocol          = "TCP"
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.probe.arn
  }
}

