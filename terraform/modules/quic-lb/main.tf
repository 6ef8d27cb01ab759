# A public UDP Network Load Balancer for QUIC in front of instances (relay nodes
# or routers): its security group (QUIC in from clients, out to the targets; health
# checks out to the targets' metrics port), the load balancer, the QUIC target
# group with an HTTP /healthz health check, and the UDP listener. Used by
# modules/cell and modules/router.

resource "aws_security_group" "nlb" {
  name_prefix = "${var.name}-nlb-"
  description = var.description
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-nlb" })

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
  description                  = "QUIC to the ${var.role}"
  ip_protocol                  = "udp"
  from_port                    = var.quic_port
  to_port                      = var.quic_port
  referenced_security_group_id = var.target_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "nlb_health" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Health checks to the ${var.role}"
  ip_protocol                  = "tcp"
  from_port                    = var.metrics_port
  to_port                      = var.metrics_port
  referenced_security_group_id = var.target_security_group_id
}

resource "aws_lb" "this" {
  name                             = substr("${var.name}-nlb", 0, 32)
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = var.subnet_ids
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = var.tags
}

resource "aws_lb_target_group" "quic" {
  name_prefix          = var.target_group_prefix
  port                 = var.quic_port
  protocol             = "UDP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = var.deregistration_delay
  tags                 = var.tags

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
  tags              = var.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.quic.arn
  }
}
