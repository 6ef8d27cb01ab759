# One TLS listener on a Network Load Balancer that ends TLS (TLS 1.3/1.2 policy) and
# forwards plain TCP to the targets' port, with /readyz health checks on their metrics
# port, and the load balancer's security group rules for it: in from client_cidrs on the
# TLS port, out to the targets on their port. Client IPs are preserved (the targets' rate
# limits and penalty box see them).

resource "aws_vpc_security_group_ingress_rule" "clients" {
  for_each = toset(var.client_cidrs)

  security_group_id = var.load_balancer_security_group_id
  description       = "${var.what} from clients"
  ip_protocol       = "tcp"
  from_port         = var.tls_port
  to_port           = var.tls_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "targets" {
  security_group_id            = var.load_balancer_security_group_id
  description                  = "${var.what}: to the targets"
  ip_protocol                  = "tcp"
  from_port                    = var.target_port
  to_port                      = var.target_port
  referenced_security_group_id = var.target_security_group_id
}

resource "aws_lb_target_group" "this" {
  name_prefix          = var.name_prefix
  port                 = var.target_port
  protocol             = "TCP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = var.deregistration_delay
  tags                 = var.tags

  health_check {
    protocol            = "HTTP"
    port                = tostring(var.health_port)
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

resource "aws_lb_listener" "this" {
  load_balancer_arn = var.load_balancer_arn
  port              = var.tls_port
  protocol          = "TLS"
  certificate_arn   = var.certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  tags              = var.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }
}
