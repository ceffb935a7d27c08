# Required: no defaults, so `terraform plan` asks for them (or reads a .tfvars file).

variable "region" {
  description = "AWS region for the bucket, the MLflow server and the Ray nodes (e.g. us-east-1)."
  type        = string
}

variable "bucket_name" {
  description = "Globally unique name of the S3 bucket for checkpoints and artifacts (s3://BUCKET/...)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 chars, lowercase, digits, dots, hyphens)."
  }
}

variable "vpc_id" {
  description = "VPC the Ray nodes, the MLflow server and its database run in."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets (at least two availability zones) for RDS, the MLflow service and its internal load balancer; the first one is also RLR_DIST_SUBNET_ID for the Ray nodes. They need a NAT gateway (or VPC endpoints) to pull images."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "subnet_ids needs at least two subnets in different availability zones (RDS and ALB require it)."
  }
}

variable "cluster_name" {
  description = "Ray cluster name (cluster_name in cluster/aws.yaml). The autoscaler's EC2 permissions are limited to instances tagged ray-cluster-name=<this>."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}$", var.cluster_name))
    error_message = "cluster_name: lowercase letters, digits and hyphens, at most 31 characters."
  }
}

variable "mlflow_image" {
  description = "Image for the MLflow tracking server: the `mlflow` target of infra/Dockerfile (mlflow 3.17.2, boto3, psycopg2), pinned by tag or digest."
  type        = string
}

# Optional.

variable "admin_cidr_blocks" {
  description = "CIDR blocks allowed to reach the Ray head (SSH 22, dashboard / job API 8265) and the MLflow load balancer. Empty: nothing from outside the Ray nodes' security group."
  type        = list(string)
  default     = []
}

variable "noncurrent_version_expiration_days" {
  description = "Days after which overwritten / deleted object versions in the bucket are removed."
  type        = number
  default     = 30
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which unfinished multipart uploads (interrupted checkpoint writes) are aborted."
  type        = number
  default     = 7
}

variable "db_instance_class" {
  description = "RDS instance class for the MLflow backend store."
  type        = string
  default     = "db.t4g.small"
}

variable "db_allocated_storage_gb" {
  description = "Initial RDS storage in GiB (grows automatically up to 5x)."
  type        = number
  default     = 20
}

variable "postgres_engine_version" {
  description = "RDS PostgreSQL major version."
  type        = string
  default     = "16"
}

variable "mlflow_cpu" {
  description = "Fargate CPU units for the MLflow task."
  type        = number
  default     = 1024
}

variable "mlflow_memory" {
  description = "Fargate memory (MiB) for the MLflow task."
  type        = number
  default     = 2048
}

variable "deletion_protection" {
  description = "Protect the MLflow database from deletion (turn off before `terraform destroy`)."
  type        = bool
  default     = true
}

variable "create_spot_service_linked_role" {
  description = "Create the EC2 Spot service-linked role (AWSServiceRoleForEC2Spot). Only needed once per account, and only if it does not exist yet."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
