# Launch template and autoscaling group of the relay nodes.

resource "aws_launch_template" "node" {
  name_prefix   = "${local.name}-"
  description   = "Meridian relay node of cell ${var.cell_id}"
  image_id      = data.aws_ssm_parameter.ami.value
  instance_type = var.instance_type
  ebs_optimized = true
  user_data     = base64encode(local.user_data)
  tags          = local.tags

  update_default_version = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  network_interfaces {
    associate_public_ip_address = var.public_addresses
    delete_on_termination       = true
    security_groups             = [aws_security_group.node.id, aws_security_group.gossip.id]
  }

  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_type           = "gp3"
      volume_size           = 20
      encrypted             = true
      kms_key_id            = var.kms_key_arn
      delete_on_termination = true
    }
  }

  dynamic "block_device_mappings" {
    for_each = var.data_volume == "gp3" ? [1] : []

    content {
      device_name = "/dev/sdf"

      ebs {
        volume_type           = "gp3"
        volume_size           = var.gp3_size_gib
        iops                  = var.gp3_iops
        throughput            = var.gp3_throughput
        encrypted             = true
        kms_key_id            = var.kms_key_arn
        delete_on_termination = true
      }
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = local.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = local.tags
  }

  lifecycle {
    precondition {
      condition     = contains(var.jurisdiction_regions, local.region)
      error_message = "Residency: a cell must lie in one of its jurisdiction's regions."
    }
  }
}

resource "aws_autoscaling_group" "node" {
  name_prefix               = "${local.name}-"
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  vpc_zone_identifier       = var.subnet_ids
  target_group_arns         = [module.lb.target_group_arn, aws_lb_target_group.probe.arn, module.gateway_tls.target_group_arn, module.api_tls.target_group_arn]
  health_check_type         = "ELB"
  health_check_grace_period = 120
  default_instance_warmup   = 120
  termination_policies      = ["OldestLaunchTemplate", "OldestInstance"]
  wait_for_capacity_timeout = "15m"

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  # One node at a time, so gossip and document ownership settle between steps.
  instance_refresh {
    strategy = "Rolling"

    preferences {
      min_healthy_percentage = 66
      instance_warmup        = 120
    }
  }

  dynamic "tag" {
    for_each = local.tags

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  depends_on = [
    aws_iam_role_policy.node,
    aws_secretsmanager_secret_version.gossip,
  ]
}
