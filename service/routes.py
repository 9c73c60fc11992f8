"""Every endpoint of the API in one table."""

from __future__ import annotations

from core.auth import Token, TokenCreate, TokenCreated
from core.executions import (
    Counters,
    Execution,
    ExecutionBatch,
    ExecutionCreate,
    LogLine,
    ProgressUpdate,
)
from core.packages import Package, RevisionSummary
from core.pagination import Page
from core.projects import Project, ProjectCreate, ProjectPatch
from core.services import Service, ServiceCreate, ServicePatch, ServiceStatus
from service import executions, health, packages, projects, services
from service import queries as q
from service.http import Route

V1 = "/api/v1"

ROUTES: list[Route] = [
    Route("GET", "/healthz", health.healthz, "Liveness", "health", auth=False),
    Route("GET", "/readyz", health.readyz, "Readiness: PostgreSQL and Redis reachable", "health",
          auth=False, errors=(503,)),
    # Projects and tokens
    Route("POST", f"{V1}/projects", projects.create_project, "Create a project", "projects",
          body=ProjectCreate, response=Project, status=201, errors=(403, 409, 422)),
    Route("GET", f"{V1}/projects", projects.list_projects, "List projects", "projects",
          query=q.ListQuery, response=Page[Project]),
    Route("GET", f"{V1}/projects/{{id}}", projects.get_project, "Get a project", "projects",
          response=Project, errors=(404,)),
    Route("PATCH", f"{V1}/projects/{{id}}", projects.update_project, "Update a project",
          "projects", body=ProjectPatch, response=Project, errors=(403, 404, 409, 422)),
    Route("DELETE", f"{V1}/projects/{{id}}", projects.delete_project, "Delete a project and all it holds",
          "projects", status=204, errors=(403, 404)),
    Route("POST", f"{V1}/tokens", projects.create_token, "Create a token (the secret is shown once)",
          "tokens", body=TokenCreate, response=TokenCreated, status=201, errors=(403, 404, 422)),
    Route("GET", f"{V1}/tokens", projects.list_tokens, "List tokens", "tokens",
          query=q.ProjectFilter, response=Page[Token], errors=(403,)),
    Route("DELETE", f"{V1}/tokens/{{id}}", projects.delete_token, "Revoke a token", "tokens",
          status=204, errors=(403, 404)),
    # Packages
    Route("POST", f"{V1}/packages", packages.create_package, "Upload a package", "packages",
          form=packages.PackageUpload, response=Package, status=201,
          errors=(400, 403, 404, 409, 413, 422)),
    Route("GET", f"{V1}/packages", packages.list_packages, "List packages", "packages",
          query=q.PackageList, response=Page[Package]),
    Route("GET", f"{V1}/packages/{{id}}", packages.get_package, "Get a package (a revision of it)",
          "packages", query=q.RevisionQuery, response=Package, errors=(404,)),
    Route("DELETE", f"{V1}/packages/{{id}}", packages.delete_package, "Delete a package",
          "packages", query=q.ForceQuery, status=204, errors=(403, 404, 409)),
    Route("POST", f"{V1}/packages/{{id}}/revisions", packages.add_revision,
          "Upload the next revision", "packages", form=packages.PackageUpload, response=Package,
          status=201, errors=(400, 403, 404, 413, 422)),
    Route("GET", f"{V1}/packages/{{id}}/revisions", packages.list_revisions, "List revisions",
          "packages", response=Page[RevisionSummary], errors=(404,)),
    Route("GET", f"{V1}/packages/{{id}}/codebase", packages.download_codebase,
          "Download a revision's codebase archive", "packages", query=q.RevisionQuery,
          errors=(404,), extra_responses={"content": {"application/zip": {}, "application/gzip": {}}}),
    # Services
    Route("POST", f"{V1}/services", services.create_service, "Deploy a service", "services",
          body=ServiceCreate, response=Service, status=201, errors=(403, 404, 409, 422)),
    Route("GET", f"{V1}/services", services.list_services, "List services", "services",
          query=q.ServiceList, response=Page[Service]),
    Route("GET", f"{V1}/services/{{id}}", services.get_service, "Get a service", "services",
          response=Service, errors=(404,)),
    Route("PATCH", f"{V1}/services/{{id}}", services.update_service,
          "Update a service (revision or runtime changes roll replicas over)", "services",
          body=ServicePatch, response=Service, errors=(403, 404, 409, 422)),
    Route("DELETE", f"{V1}/services/{{id}}", services.delete_service, "Delete a service",
          "services", status=204, errors=(403, 404)),
    Route("POST", f"{V1}/services/{{id}}/pause", services.pause_service, "Pause a service",
          "services", response=Service, errors=(403, 404)),
    Route("POST", f"{V1}/services/{{id}}/resume", services.resume_service, "Resume a service",
          "services", response=Service, errors=(403, 404)),
    Route("GET", f"{V1}/services/{{id}}/status", services.service_status,
          "Queue length, in-progress count and replicas", "services", response=ServiceStatus,
          errors=(404,)),
    # Executions
    Route("POST", f"{V1}/executions", executions.create_execution, "Run a function", "executions",
          body=ExecutionCreate, response=Execution, status=201, errors=(403, 422)),
    Route("POST", f"{V1}/executions/batch", executions.create_batch,
          "Run many functions in one transaction", "executions", body=ExecutionBatch,
          response=dict[str, list[Execution]], status=201, errors=(403, 422)),
    Route("GET", f"{V1}/executions", executions.list_executions, "List executions", "executions",
          query=q.ExecutionList, response=Page[Execution], errors=(422,)),
    Route("GET", f"{V1}/executions/counters", executions.counters, "Counts by status",
          "executions", query=q.CounterQuery, response=Counters),
    Route("GET", f"{V1}/executions/{{id}}", executions.get_execution, "Get an execution",
          "executions", response=Execution, errors=(404,)),
    Route("GET", f"{V1}/executions/{{id}}/wait", executions.wait_execution,
          "Wait for a terminal status (or the timeout)", "executions", query=q.WaitQuery,
          response=Execution, errors=(404,)),
    Route("POST", f"{V1}/executions/{{id}}/terminate", executions.terminate,
          "Terminate an execution", "executions", response=Execution, status=202,
          errors=(403, 404, 409)),
    Route("POST", f"{V1}/executions/{{id}}/rerun", executions.rerun,
          "Run an execution again as a new one", "executions", response=Execution, status=201,
          errors=(403, 404, 422)),
    Route("POST", f"{V1}/executions/{{id}}/progress", executions.update_progress,
          "Report progress", "executions", body=ProgressUpdate, response=Execution,
          errors=(403, 404, 409)),
    Route("GET", f"{V1}/executions/{{id}}/logs", executions.list_logs, "An execution's log lines",
          "executions", query=q.LogQuery, response=Page[LogLine], errors=(404,)),
]
