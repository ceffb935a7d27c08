# rlr-dist AWS infrastructure: artifact bucket, Ray node role, MLflow tracking server.
# No credentials in this configuration: the provider uses the caller's AWS profile / SSO session,
# and the database password is generated and stored by RDS in Secrets Manager.

provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, {
      "project"    = "rlr-dist"
      "managed-by" = "terraform"
    })
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id    = data.aws_caller_identity.current.account_id
  partition     = data.aws_partition.current.partition
  name          = "${var.cluster_name}-rlr-dist"
  mlflow_prefix = "mlflow"
  ec2_arn       = "arn:${local.partition}:ec2:${var.region}:${local.account_id}"
}

# ============================================================================ artifact bucket

resource "aws_kms_key" "artifacts" {
  description             = "rlr-dist ${var.cluster_name}: checkpoints and artifacts"
  enable_key_rotation     = true
  deletion_window_in_days = 30
}

resource "aws_kms_alias" "artifacts" {
  name          = "alias/${local.name}-artifacts"
  target_key_id = aws_kms_key.artifacts.key_id
}

resource "aws_s3_bucket" "artifacts" {
  bucket        = var.bucket_name
  force_destroy = false
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.artifacts.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  # Versioning must be on before noncurrent-version rules mean anything.
  depends_on = [aws_s3_bucket_versioning.artifacts]

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    expiration {
      expired_object_delete_marker = true
    }
  }

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }
}

data "aws_iam_policy_document" "artifacts_bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"]
    resources = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]

    principals {
      type        = "AWS"
      identifiers = [local.account_id]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket     = aws_s3_bucket.artifacts.id
  policy     = data.aws_iam_policy_document.artifacts_bucket.json
  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

# ============================================================================ networking

resource "aws_security_group" "ray_nodes" {
  name        = "${local.name}-ray-nodes"
  description = "Ray head and workers of ${var.cluster_name}"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "ray_nodes_internal" {
  security_group_id            = aws_security_group.ray_nodes.id
  referenced_security_group_id = aws_security_group.ray_nodes.id
  ip_protocol                  = "-1"
  description                  = "Ray traffic between the cluster's nodes"
}

resource "aws_vpc_security_group_ingress_rule" "ray_nodes_ssh" {
  for_each          = toset(var.admin_cidr_blocks)
  security_group_id = aws_security_group.ray_nodes.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  description       = "ray up / ray attach"
}

resource "aws_vpc_security_group_ingress_rule" "ray_nodes_dashboard" {
  for_each          = toset(var.admin_cidr_blocks)
  security_group_id = aws_security_group.ray_nodes.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 8265
  to_port           = 8265
  description       = "Ray dashboard and job submission API"
}

resource "aws_vpc_security_group_egress_rule" "ray_nodes_all" {
  security_group_id = aws_security_group.ray_nodes.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "Image pulls, S3, model downloads"
}

resource "aws_security_group" "mlflow_lb" {
  name        = "${local.name}-mlflow-lb"
  description = "Internal load balancer in front of the MLflow tracking server"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_lb_from_ray" {
  security_group_id            = aws_security_group.mlflow_lb.id
  referenced_security_group_id = aws_security_group.ray_nodes.id
  ip_protocol                  = "tcp"
  from_port                    = 80
  to_port                      = 80
  description                  = "MLflow from the Ray nodes"
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_lb_from_admin" {
  for_each          = toset(var.admin_cidr_blocks)
  security_group_id = aws_security_group.mlflow_lb.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  description       = "MLflow UI"
}

resource "aws_vpc_security_group_egress_rule" "mlflow_lb_to_task" {
  security_group_id            = aws_security_group.mlflow_lb.id
  referenced_security_group_id = aws_security_group.mlflow_task.id
  ip_protocol                  = "tcp"
  from_port                    = 5000
  to_port                      = 5000
}

resource "aws_security_group" "mlflow_task" {
  name        = "${local.name}-mlflow-task"
  description = "MLflow tracking server tasks"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_task_from_lb" {
  security_group_id            = aws_security_group.mlflow_task.id
  referenced_security_group_id = aws_security_group.mlflow_lb.id
  ip_protocol                  = "tcp"
  from_port                    = 5000
  to_port                      = 5000
}

resource "aws_vpc_security_group_egress_rule" "mlflow_task_all" {
  security_group_id = aws_security_group.mlflow_task.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "Database, S3, Secrets Manager, image pull"
}

resource "aws_security_group" "mlflow_db" {
  name        = "${local.name}-mlflow-db"
  description = "MLflow backend store (PostgreSQL)"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_db_from_task" {
  security_group_id            = aws_security_group.mlflow_db.id
  referenced_security_group_id = aws_security_group.mlflow_task.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

# ============================================================================ Ray node role

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_node" {
  name               = "${local.name}-ray-node"
  description        = "Ray head and worker nodes of ${var.cluster_name}: artifact bucket + autoscaler"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_instance_profile" "ray_node" {
  name = "${local.name}-ray-node"
  role = aws_iam_role.ray_node.name
}

data "aws_iam_policy_document" "ray_node" {
  # --- artifact bucket: this bucket only --------------------------------------------------
  statement {
    sid       = "ArtifactBucketList"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid = "ArtifactObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.artifacts.arn}/*"]
  }

  statement {
    sid       = "ArtifactKey"
    actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.artifacts.arn]
  }

  # --- Ray autoscaler on the head: launch / tag / terminate this cluster's workers ---------
  statement {
    sid = "Ec2Describe"
    # Describe* calls do not support resource-level permissions.
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceStatus",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
      "ec2:DescribeAvailabilityZones",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "RunTaggedInstances"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  statement {
    sid     = "RunInstancesDependencies"
    actions = ["ec2:RunInstances"]
    resources = concat(
      [for s in var.subnet_ids : "${local.ec2_arn}:subnet/${s}"],
      [
        aws_security_group.ray_nodes.arn,
        "${local.ec2_arn}:network-interface/*",
        "${local.ec2_arn}:volume/*",
        "${local.ec2_arn}:key-pair/*",
        "${local.ec2_arn}:spot-instances-request/*",
        "arn:${local.partition}:ec2:${var.region}::image/*",
      ],
    )
  }

  statement {
    sid       = "TagOnLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOwnInstances"
    actions   = ["ec2:CreateTags", "ec2:DeleteTags", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]
    resources = ["${local.ec2_arn}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  statement {
    sid       = "ResolveDeepLearningAmi"
    actions   = ["ssm:GetParameters", "ssm:GetParameter"]
    resources = ["arn:${local.partition}:ssm:${var.region}::parameter/aws/service/deeplearning/*"]
  }

  statement {
    sid       = "PassOwnRoleToWorkers"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.ray_node.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }

  statement {
    sid       = "ReadOwnInstanceProfile"
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.ray_node.arn]
  }
}

resource "aws_iam_role_policy" "ray_node" {
  name   = "rlr-dist-ray-node"
  role   = aws_iam_role.ray_node.id
  policy = data.aws_iam_policy_document.ray_node.json
}

resource "aws_iam_service_linked_role" "spot" {
  count            = var.create_spot_service_linked_role ? 1 : 0
  aws_service_name = "spot.amazonaws.com"
}

# ============================================================================ MLflow: database

resource "aws_db_subnet_group" "mlflow" {
  name       = "${local.name}-mlflow"
  subnet_ids = var.subnet_ids
}

resource "aws_db_instance" "mlflow" {
  identifier     = "${local.name}-mlflow"
  engine         = "postgres"
  engine_version = var.postgres_engine_version
  instance_class = var.db_instance_class

  allocated_storage     = var.db_allocated_storage_gb
  max_allocated_storage = var.db_allocated_storage_gb * 5
  storage_type          = "gp3"
  storage_encrypted     = true

  db_name  = "mlflow"
  username = "mlflow"
  # RDS generates the password and keeps it (rotated) in Secrets Manager; it never appears here
  # or in the state file.
  manage_master_user_password = true

  db_subnet_group_name   = aws_db_subnet_group.mlflow.name
  vpc_security_group_ids = [aws_security_group.mlflow_db.id]
  publicly_accessible    = false

  backup_retention_period   = 7
  deletion_protection       = var.deletion_protection
  skip_final_snapshot       = false
  final_snapshot_identifier = "${local.name}-mlflow-final"
  copy_tags_to_snapshot     = true
  apply_immediately         = false
}

# ============================================================================ MLflow: server on ECS Fargate

resource "aws_cloudwatch_log_group" "mlflow" {
  name              = "/rlr-dist/${var.cluster_name}/mlflow"
  retention_in_days = 30
}

resource "aws_ecs_cluster" "mlflow" {
  name = "${local.name}-mlflow"
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

# Execution role: pull the image, write logs, read the database secret into the container env.
resource "aws_iam_role" "mlflow_execution" {
  name               = "${local.name}-mlflow-exec"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "mlflow_execution" {
  role       = aws_iam_role.mlflow_execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "mlflow_execution" {
  statement {
    sid       = "ReadDatabaseSecret"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_db_instance.mlflow.master_user_secret[0].secret_arn]
  }
}

resource "aws_iam_role_policy" "mlflow_execution" {
  name   = "read-db-secret"
  role   = aws_iam_role.mlflow_execution.id
  policy = data.aws_iam_policy_document.mlflow_execution.json
}

# Task role: the server proxies artifact uploads/downloads to s3://BUCKET/mlflow/ (--serve-artifacts).
resource "aws_iam_role" "mlflow_task" {
  name               = "${local.name}-mlflow-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "mlflow_task" {
  statement {
    sid       = "ListMlflowPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.artifacts.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.mlflow_prefix}/*", local.mlflow_prefix]
    }
  }

  statement {
    sid       = "MlflowArtifacts"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.artifacts.arn}/${local.mlflow_prefix}/*"]
  }

  statement {
    sid       = "ArtifactKey"
    actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.artifacts.arn]
  }
}

resource "aws_iam_role_policy" "mlflow_task" {
  name   = "mlflow-artifacts"
  role   = aws_iam_role.mlflow_task.id
  policy = data.aws_iam_policy_document.mlflow_task.json
}

locals {
  mlflow_artifacts = "s3://${aws_s3_bucket.artifacts.bucket}/${local.mlflow_prefix}"
  # Host headers MLflow accepts (its DNS-rebinding guard): the load balancer's name, and private IPs
  # for the load balancer's health checks.
  mlflow_allowed_hosts = join(",", [aws_lb.mlflow.dns_name, "${aws_lb.mlflow.dns_name}:80", "localhost", "localhost:5000", "10.*", "172.*", "192.168.*"])
  # The password arrives as DB_PASSWORD (from Secrets Manager) and is URL-quoted before it goes into
  # the connection URI; it is never written to this configuration, the task definition or the state.
  mlflow_start = join(" ", [
    "DB_PASSWORD_Q=$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ[\"DB_PASSWORD\"], safe=\"\"))')",
    "&& exec mlflow server --host 0.0.0.0 --port 5000 --workers 2",
    "--backend-store-uri \"postgresql://$DB_USER:$DB_PASSWORD_Q@$DB_HOST:$DB_PORT/$DB_NAME\"",
    "--artifacts-destination \"$ARTIFACTS_DESTINATION\" --serve-artifacts",
    "--allowed-hosts \"$ALLOWED_HOSTS\"",
  ])
}

resource "aws_ecs_task_definition" "mlflow" {
  family                   = "${local.name}-mlflow"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.mlflow_cpu
  memory                   = var.mlflow_memory
  execution_role_arn       = aws_iam_role.mlflow_execution.arn
  task_role_arn            = aws_iam_role.mlflow_task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  container_definitions = jsonencode([
    {
      name         = "mlflow"
      image        = var.mlflow_image
      essential    = true
      entryPoint   = ["/bin/sh", "-c"]
      command      = [local.mlflow_start]
      portMappings = [{ containerPort = 5000, protocol = "tcp" }]
      environment = [
        { name = "DB_HOST", value = aws_db_instance.mlflow.address },
        { name = "DB_PORT", value = tostring(aws_db_instance.mlflow.port) },
        { name = "DB_NAME", value = aws_db_instance.mlflow.db_name },
        { name = "DB_USER", value = aws_db_instance.mlflow.username },
        { name = "ARTIFACTS_DESTINATION", value = local.mlflow_artifacts },
        { name = "ALLOWED_HOSTS", value = local.mlflow_allowed_hosts },
        { name = "AWS_REGION", value = var.region },
      ]
      secrets = [
        { name = "DB_PASSWORD", valueFrom = "${aws_db_instance.mlflow.master_user_secret[0].secret_arn}:password::" },
      ]
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.mlflow.name
          "awslogs-region"        = var.region
          "awslogs-stream-prefix" = "mlflow"
        }
      }
    },
  ])
}

resource "aws_lb" "mlflow" {
  name               = substr("${var.cluster_name}-mlflow", 0, 32)
  internal           = true
  load_balancer_type = "application"
  security_groups    = [aws_security_group.mlflow_lb.id]
  subnets            = var.subnet_ids
  idle_timeout       = 300
}

resource "aws_lb_target_group" "mlflow" {
  name        = substr("${var.cluster_name}-mlflow", 0, 32)
  port        = 5000
  protocol    = "HTTP"
  target_type = "ip"
  vpc_id      = var.vpc_id

  health_check {
    path                = "/health"
    matcher             = "200"
    interval            = 30
    healthy_threshold   = 2
    unhealthy_threshold = 5
  }
}

resource "aws_lb_listener" "mlflow" {
  load_balancer_arn = aws_lb.mlflow.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.mlflow.arn
  }
}

resource "aws_ecs_service" "mlflow" {
  name            = "mlflow"
  cluster         = aws_ecs_cluster.mlflow.id
  task_definition = aws_ecs_task_definition.mlflow.arn
  desired_count   = 1
  launch_type     = "FARGATE"

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.mlflow_task.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.mlflow.arn
    container_name   = "mlflow"
    container_port   = 5000
  }

  depends_on = [aws_lb_listener.mlflow]
}
