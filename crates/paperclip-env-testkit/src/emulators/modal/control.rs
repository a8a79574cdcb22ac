//! The control plane: `modal.client.ModalClient`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use futures::Stream;
use paperclip_env_modal_proto::api::generic_result::GenericStatus;
use paperclip_env_modal_proto::api::modal_client_server::ModalClient;
use paperclip_env_modal_proto::api::*;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::{Fault, IdempotentAnswer, Image, RecordedCall, Route, Sandbox, Service, lock};

fn header(meta: &MetadataMap, key: &str) -> Option<String> {
    meta.get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl Service {
    /// Records the call, checks credentials and applies a queued status fault.
    pub(crate) fn admit(
        &self,
        meta: &MetadataMap,
        rpc: &'static str,
        route: Route,
    ) -> Result<Option<Fault>, Status> {
        let shared = &self.shared;
        let id_ok = header(meta, "x-modal-token-id").as_deref() == Some(shared.token_id.as_str());
        let secret_ok =
            header(meta, "x-modal-token-secret").as_deref() == Some(shared.token_secret.as_str());
        let auth = header(meta, "x-modal-auth-token");
        // Modal's clients do not all send an auth token (Python's sends none
        // before it has one): only a token that is sent must be valid.
        let auth_ok = route == Route::AuthTokenGet
            || auth.as_ref().is_none_or(|token| {
                lock(&shared.auth_tokens)
                    .iter()
                    .any(|(t, exp)| t == token && *exp > SystemTime::now())
            });
        lock(&shared.calls).push(RecordedCall {
            rpc,
            idempotency_key: header(meta, "x-idempotency-key"),
            retry_attempt: header(meta, "x-retry-attempt"),
            throttle_retry_attempt: header(meta, "x-throttle-retry-attempt"),
            client_type: header(meta, "x-modal-client-type"),
            client_version: header(meta, "x-modal-client-version"),
            had_auth_token: auth.is_some(),
            authorized: id_ok && secret_ok && auth_ok,
        });
        if matches!(route, Route::SandboxCreate | Route::SandboxCreateV2) {
            shared.creates.fetch_add(1, Ordering::SeqCst);
        }
        if route == Route::ContainerExec {
            shared.exec_starts.fetch_add(1, Ordering::SeqCst);
        }
        if !(id_ok && secret_ok) {
            return Err(Status::unauthenticated("Invalid token id or secret"));
        }
        if !auth_ok {
            return Err(Status::unauthenticated("Missing or expired auth token"));
        }
        shared.status_fault(route)
    }

    /// Runs `f` on sandbox `id`. A V1 call about a V2 sandbox (or the
    /// reverse) finds nothing, as on Modal, where the two live apart.
    pub(crate) fn with_sandbox<T>(
        &self,
        id: &str,
        v2: bool,
        f: impl FnOnce(&mut Sandbox) -> T,
    ) -> Result<T, Status> {
        let mut sandboxes = lock(&self.shared.sandboxes);
        let sandbox = sandboxes
            .get_mut(id)
            .filter(|s| s.v2 == v2)
            .ok_or_else(|| Status::not_found(format!("Sandbox with id: '{id}' not found")))?;
        // Any call about a sandbox counts as activity for its idle timeout.
        sandbox.last_activity = Instant::now();
        Ok(f(sandbox))
    }
}

/// `ResponseLost`: the effect happened, the answer does not arrive.
fn lost(fault: &Option<Fault>) -> Result<(), Status> {
    if matches!(fault, Some(Fault::ResponseLost)) {
        return Err(Status::unavailable(
            "connection reset (injected: response lost)",
        ));
    }
    Ok(())
}

impl Service {
    /// Creates a sandbox in a task of its own, so a client that gives up
    /// (or a `SlowCreate` outliving the call) does not stop it; a retry with
    /// the same idempotency key gets the first answer.
    #[allow(clippy::too_many_arguments)]
    async fn create_detached(
        &self,
        rpc: &'static str,
        key: Option<String>,
        fault: Option<Fault>,
        v2: bool,
        app_id: String,
        definition: Option<paperclip_env_modal_proto::api::Sandbox>,
        tags: Vec<SandboxTag>,
    ) -> Result<IdempotentAnswer, Status> {
        if let Some(key) = &key
            && let Some(answer) = lock(&self.shared.idempotent).get(&(rpc, key.clone()))
        {
            return Ok(answer.clone());
        }
        let delay = match fault {
            Some(Fault::SlowCreate(d)) => d,
            _ => Duration::ZERO,
        };
        let service = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let answer = service.create(v2, app_id, definition, tags)?;
            if let Some(key) = key {
                lock(&service.shared.idempotent).insert((rpc, key), answer.clone());
            }
            Ok(answer)
        })
        .await
        .map_err(|_| Status::internal("create task failed"))?
    }

    fn create(
        &self,
        v2: bool,
        app_id: String,
        definition: Option<paperclip_env_modal_proto::api::Sandbox>,
        tags: Vec<SandboxTag>,
    ) -> Result<IdempotentAnswer, Status> {
        let definition =
            definition.ok_or_else(|| Status::invalid_argument("definition is required"))?;
        if !lock(&self.shared.apps).values().any(|a| *a == app_id) {
            return Err(Status::not_found(format!("App {app_id} not found")));
        }
        if !lock(&self.shared.images)
            .values()
            .any(|i| i.id == definition.image_id)
        {
            return Err(Status::not_found(format!(
                "Image {} not found",
                definition.image_id
            )));
        }
        if definition.timeout_secs == 0 || definition.timeout_secs > 86_400 {
            return Err(Status::invalid_argument(
                "timeout_secs must be between 1 and 86400",
            ));
        }
        if let Some(workdir) = &definition.workdir
            && !workdir.starts_with('/')
        {
            return Err(Status::invalid_argument(format!(
                "workdir must be an absolute path, got: {workdir}"
            )));
        }
        let (id, task_id) = if v2 {
            (
                format!("sb-{}", super::ulid()),
                format!("ta-{}", super::ulid()),
            )
        } else {
            (
                format!("sb-{}", super::base62_22()),
                format!("ta-{}", super::base62_22()),
            )
        };
        let home = self.shared.sandbox_home(&id);
        std::fs::create_dir_all(&home).map_err(|e| Status::internal(e.to_string()))?;
        let now = Instant::now();
        let sandbox = Sandbox {
            id: id.clone(),
            v2,
            task_id: task_id.clone(),
            app_id: app_id.clone(),
            definition,
            home,
            tags: tags
                .into_iter()
                .map(|t| (t.tag_name, t.tag_value))
                .collect(),
            result: None,
            execs: HashMap::new(),
            // V2 creates answer once the task is placed.
            task_id_polls: if v2 {
                0
            } else {
                self.shared.task_id_polls.load(Ordering::SeqCst)
            },
            created: now,
            last_activity: now,
            router_jwts: Vec::new(),
        };
        lock(&self.shared.sandboxes).insert(id.clone(), sandbox);
        let metadata = Some(SandboxHandleMetadata {
            result: None,
            app_id,
        });
        if !v2 {
            return Ok(IdempotentAnswer::V1(SandboxCreateResponse {
                sandbox_id: id,
                metadata,
            }));
        }
        let access = self.router_access(|s| s.id == id, &id, &None)?;
        Ok(IdempotentAnswer::V2(SandboxCreateV2Response {
            sandbox_id: id,
            task_id,
            metadata,
            command_router_access: Some(access),
        }))
    }

    fn tags_set(&self, req: SandboxTagsSetRequest, v2: bool) -> Result<Response<()>, Status> {
        self.with_sandbox(&req.sandbox_id, v2, |s| {
            for tag in req.tags {
                s.tags.insert(tag.tag_name, tag.tag_value);
            }
        })?;
        Ok(Response::new(()))
    }

    async fn wait(
        &self,
        req: SandboxWaitRequest,
        v2: bool,
    ) -> Result<Response<SandboxWaitResponse>, Status> {
        let deadline = Instant::now() + Duration::from_secs_f32(req.timeout.clamp(0.0, 60.0));
        loop {
            let (result, app_id) = self.with_sandbox(&req.sandbox_id, v2, |s| {
                (s.result.clone(), s.app_id.clone())
            })?;
            if result.is_some() || Instant::now() >= deadline {
                return Ok(Response::new(SandboxWaitResponse {
                    result: result.clone(),
                    metadata: Some(SandboxHandleMetadata { result, app_id }),
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn terminate(
        &self,
        req: SandboxTerminateRequest,
        v2: bool,
    ) -> Result<Response<SandboxTerminateResponse>, Status> {
        let existing = self.with_sandbox(&req.sandbox_id, v2, |s| {
            let existing = s.result.clone();
            s.finish(GenericStatus::Terminated);
            existing
        })?;
        Ok(Response::new(SandboxTerminateResponse {
            existing_result: existing,
        }))
    }

    fn get_task_id(
        &self,
        req: SandboxGetTaskIdRequest,
        v2: bool,
    ) -> Result<Response<SandboxGetTaskIdResponse>, Status> {
        let response = self.with_sandbox(&req.sandbox_id, v2, |s| {
            if let Some(result) = &s.result {
                return SandboxGetTaskIdResponse {
                    task_id: None,
                    task_result: Some(result.clone()),
                };
            }
            if s.task_id_polls > 0 {
                s.task_id_polls -= 1;
                return SandboxGetTaskIdResponse::default();
            }
            SandboxGetTaskIdResponse {
                task_id: Some(s.task_id.clone()),
                task_result: None,
            }
        })?;
        Ok(Response::new(response))
    }

    /// A router JWT and URL for the sandbox `find` picks.
    fn router_access(
        &self,
        find: impl Fn(&Sandbox) -> bool,
        what: &str,
        fault: &Option<Fault>,
    ) -> Result<CommandRouterAccess, Status> {
        if !self.shared.router_enabled.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition(
                "command router is not enabled for this task",
            ));
        }
        let addr = lock(&self.shared.addr)
            .ok_or_else(|| Status::unavailable("emulator address unknown"))?;
        let mut sandboxes = lock(&self.shared.sandboxes);
        let sandbox = sandboxes
            .values_mut()
            .find(|s| find(s))
            .ok_or_else(|| Status::not_found(format!("Task {what} not found")))?;
        if sandbox.result.is_some() {
            return Err(Status::failed_precondition("task has already finished"));
        }
        let ttl = *lock(&self.shared.router_token_ttl);
        let jwt = self.shared.jwt(ttl, &sandbox.task_id);
        sandbox.router_jwts.push(jwt.clone());
        let url = if matches!(fault, Some(Fault::RouterUrlChanged)) {
            format!("https://localhost:{}", addr.port())
        } else {
            format!("https://{addr}")
        };
        Ok(CommandRouterAccess { jwt, url })
    }
}

type JoinStream = Pin<Box<dyn Stream<Item = Result<ImageJoinStreamingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ModalClient for Service {
    async fn auth_token_get(
        &self,
        request: Request<AuthTokenGetRequest>,
    ) -> Result<Response<AuthTokenGetResponse>, Status> {
        if let Some(Fault::EmptyAuthToken) =
            self.admit(request.metadata(), "AuthTokenGet", Route::AuthTokenGet)?
        {
            return Ok(Response::new(AuthTokenGetResponse {
                token: String::new(),
            }));
        }
        let ttl = *lock(&self.shared.auth_token_ttl);
        let token = self.shared.jwt(ttl, "modal-client");
        lock(&self.shared.auth_tokens).push((token.clone(), SystemTime::now() + ttl));
        Ok(Response::new(AuthTokenGetResponse { token }))
    }

    async fn app_get_or_create(
        &self,
        request: Request<AppGetOrCreateRequest>,
    ) -> Result<Response<AppGetOrCreateResponse>, Status> {
        self.admit(request.metadata(), "AppGetOrCreate", Route::AppGetOrCreate)?;
        let req = request.into_inner();
        if req.app_name.trim().is_empty() {
            return Err(Status::invalid_argument("app name must not be empty"));
        }
        let key = (req.environment_name.clone(), req.app_name.clone());
        let mut apps = lock(&self.shared.apps);
        if let Some(id) = apps.get(&key) {
            return Ok(Response::new(AppGetOrCreateResponse { app_id: id.clone() }));
        }
        if req.object_creation_type != ObjectCreationType::CreateIfMissing as i32 {
            return Err(Status::not_found(format!(
                "App '{}' not found",
                req.app_name
            )));
        }
        let id = self.shared.next("ap");
        apps.insert(key, id.clone());
        Ok(Response::new(AppGetOrCreateResponse { app_id: id }))
    }

    async fn image_get_or_create(
        &self,
        request: Request<ImageGetOrCreateRequest>,
    ) -> Result<Response<ImageGetOrCreateResponse>, Status> {
        let fault = self.admit(
            request.metadata(),
            "ImageGetOrCreate",
            Route::ImageGetOrCreate,
        )?;
        let req = request.into_inner();
        lock(&self.shared.builder_versions).push(req.builder_version.clone());
        let commands = req.image.map(|i| i.dockerfile_commands).unwrap_or_default();
        let Some(tag) = commands
            .first()
            .and_then(|c| c.strip_prefix("FROM "))
            .map(str::to_owned)
        else {
            return Err(Status::invalid_argument("image needs a FROM command"));
        };
        let key = (req.app_id.clone(), tag);
        let mut images = lock(&self.shared.images);
        if fault.is_none()
            && let Some(image) = images.get(&key)
            && image.ready_at <= Instant::now()
            && image.result.status == GenericStatus::Success as i32
        {
            return Ok(Response::new(ImageGetOrCreateResponse {
                image_id: image.id.clone(),
                result: Some(image.result.clone()),
            }));
        }
        let (delay, result) = match fault {
            Some(Fault::SlowImageBuild(d)) => (d, GenericStatus::Success as i32),
            Some(Fault::ImageBuildFails(exception)) => {
                let id = self.shared.next("im");
                images.insert(
                    key,
                    Image {
                        id: id.clone(),
                        ready_at: Instant::now() + Duration::from_millis(50),
                        result: GenericResult {
                            status: GenericStatus::Failure as i32,
                            exception,
                            ..Default::default()
                        },
                    },
                );
                return Ok(Response::new(ImageGetOrCreateResponse {
                    image_id: id,
                    result: None,
                }));
            }
            _ => (Duration::from_millis(50), GenericStatus::Success as i32),
        };
        let id = self.shared.next("im");
        images.insert(
            key,
            Image {
                id: id.clone(),
                ready_at: Instant::now() + delay,
                result: GenericResult {
                    status: result,
                    ..Default::default()
                },
            },
        );
        // First build: no result; the client joins the build stream.
        Ok(Response::new(ImageGetOrCreateResponse {
            image_id: id,
            result: None,
        }))
    }

    type ImageJoinStreamingStream = JoinStream;

    async fn image_join_streaming(
        &self,
        request: Request<ImageJoinStreamingRequest>,
    ) -> Result<Response<JoinStream>, Status> {
        let fault = self.admit(
            request.metadata(),
            "ImageJoinStreaming",
            Route::ImageJoinStreaming,
        )?;
        let req = request.into_inner();
        lock(&self.shared.join_entry_ids).push(req.last_entry_id.clone());
        let (ready_at, result) = lock(&self.shared.images)
            .values()
            .find(|i| i.id == req.image_id)
            .map(|i| (i.ready_at, i.result.clone()))
            .ok_or_else(|| Status::not_found(format!("Image {} not found", req.image_id)))?;
        let start_entry: u64 = req
            .last_entry_id
            .strip_prefix("entry-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let stream_deadline = Instant::now()
            + Duration::from_secs_f32(if req.timeout > 0.0 {
                req.timeout.min(300.0)
            } else {
                55.0
            });
        let early = matches!(fault, Some(Fault::EndStreamEarly(_)));
        let stream = futures::stream::unfold((start_entry, false), move |(entry, done)| {
            let result = result.clone();
            async move {
                if done {
                    return None;
                }
                let now = Instant::now();
                if now >= ready_at {
                    let msg = ImageJoinStreamingResponse {
                        result: Some(result),
                        entry_id: format!("entry-{}", entry + 1),
                        eof: true,
                    };
                    return Some((Ok(msg), (entry + 1, true)));
                }
                if now >= stream_deadline || (early && entry > start_entry) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50).min(ready_at - now)).await;
                let msg = ImageJoinStreamingResponse {
                    result: None,
                    entry_id: format!("entry-{}", entry + 1),
                    eof: false,
                };
                Some((Ok(msg), (entry + 1, false)))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn environment_get_or_create(
        &self,
        request: Request<EnvironmentGetOrCreateRequest>,
    ) -> Result<Response<EnvironmentGetOrCreateResponse>, Status> {
        self.admit(
            request.metadata(),
            "EnvironmentGetOrCreate",
            Route::EnvironmentGetOrCreate,
        )?;
        let req = request.into_inner();
        // Every environment exists here; "" is the workspace default.
        let name = if req.deployment_name.trim().is_empty() {
            "main".to_owned()
        } else {
            req.deployment_name.trim().to_owned()
        };
        let id = lock(&self.shared.environments)
            .entry(name.clone())
            .or_insert_with(|| format!("en-{}", super::base62_22()))
            .clone();
        let version = lock(&self.shared.image_builder_version).clone();
        Ok(Response::new(EnvironmentGetOrCreateResponse {
            environment_id: id,
            metadata: Some(EnvironmentMetadata {
                name,
                settings: Some(EnvironmentSettings {
                    image_builder_version: version,
                    webhook_suffix: "modal.run".into(),
                }),
            }),
        }))
    }

    async fn sandbox_create(
        &self,
        request: Request<SandboxCreateRequest>,
    ) -> Result<Response<SandboxCreateResponse>, Status> {
        let key = header(request.metadata(), "x-idempotency-key");
        let fault = self.admit(request.metadata(), "SandboxCreate", Route::SandboxCreate)?;
        let req = request.into_inner();
        let answer = self
            .create_detached(
                "SandboxCreate",
                key,
                fault.clone(),
                false,
                req.app_id,
                req.definition,
                req.tags,
            )
            .await?;
        lost(&fault)?;
        match answer {
            IdempotentAnswer::V1(r) => Ok(Response::new(r)),
            IdempotentAnswer::V2(_) => Err(Status::internal("idempotency key reused across RPCs")),
        }
    }

    async fn sandbox_create_v2(
        &self,
        request: Request<SandboxCreateV2Request>,
    ) -> Result<Response<SandboxCreateV2Response>, Status> {
        let key = header(request.metadata(), "x-idempotency-key");
        let fault = self.admit(
            request.metadata(),
            "SandboxCreateV2",
            Route::SandboxCreateV2,
        )?;
        let req = request.into_inner();
        let answer = self
            .create_detached(
                "SandboxCreateV2",
                key,
                fault.clone(),
                true,
                req.app_id,
                req.definition,
                req.tags,
            )
            .await?;
        lost(&fault)?;
        match answer {
            IdempotentAnswer::V2(r) => Ok(Response::new(r)),
            IdempotentAnswer::V1(_) => Err(Status::internal("idempotency key reused across RPCs")),
        }
    }

    async fn sandbox_tags_set(
        &self,
        request: Request<SandboxTagsSetRequest>,
    ) -> Result<Response<()>, Status> {
        self.admit(request.metadata(), "SandboxTagsSet", Route::SandboxTagsSet)?;
        self.tags_set(request.into_inner(), false)
    }

    async fn sandbox_tags_set_v2(
        &self,
        request: Request<SandboxTagsSetRequest>,
    ) -> Result<Response<()>, Status> {
        self.admit(
            request.metadata(),
            "SandboxTagsSetV2",
            Route::SandboxTagsSet,
        )?;
        self.tags_set(request.into_inner(), true)
    }

    async fn sandbox_wait(
        &self,
        request: Request<SandboxWaitRequest>,
    ) -> Result<Response<SandboxWaitResponse>, Status> {
        self.admit(request.metadata(), "SandboxWait", Route::SandboxWait)?;
        self.wait(request.into_inner(), false).await
    }

    async fn sandbox_wait_v2(
        &self,
        request: Request<SandboxWaitRequest>,
    ) -> Result<Response<SandboxWaitResponse>, Status> {
        self.admit(request.metadata(), "SandboxWaitV2", Route::SandboxWait)?;
        self.wait(request.into_inner(), true).await
    }

    async fn sandbox_terminate(
        &self,
        request: Request<SandboxTerminateRequest>,
    ) -> Result<Response<SandboxTerminateResponse>, Status> {
        self.admit(
            request.metadata(),
            "SandboxTerminate",
            Route::SandboxTerminate,
        )?;
        self.terminate(request.into_inner(), false)
    }

    async fn sandbox_terminate_v2(
        &self,
        request: Request<SandboxTerminateRequest>,
    ) -> Result<Response<SandboxTerminateResponse>, Status> {
        self.admit(
            request.metadata(),
            "SandboxTerminateV2",
            Route::SandboxTerminate,
        )?;
        self.terminate(request.into_inner(), true)
    }

    async fn sandbox_get_task_id(
        &self,
        request: Request<SandboxGetTaskIdRequest>,
    ) -> Result<Response<SandboxGetTaskIdResponse>, Status> {
        self.admit(
            request.metadata(),
            "SandboxGetTaskId",
            Route::SandboxGetTaskId,
        )?;
        self.get_task_id(request.into_inner(), false)
    }

    async fn sandbox_get_task_id_v2(
        &self,
        request: Request<SandboxGetTaskIdRequest>,
    ) -> Result<Response<SandboxGetTaskIdResponse>, Status> {
        self.admit(
            request.metadata(),
            "SandboxGetTaskIdV2",
            Route::SandboxGetTaskId,
        )?;
        self.get_task_id(request.into_inner(), true)
    }

    async fn task_get_command_router_access(
        &self,
        request: Request<TaskGetCommandRouterAccessRequest>,
    ) -> Result<Response<TaskGetCommandRouterAccessResponse>, Status> {
        let fault = self.admit(
            request.metadata(),
            "TaskGetCommandRouterAccess",
            Route::TaskGetCommandRouterAccess,
        )?;
        let req = request.into_inner();
        let access = self.router_access(|s| s.task_id == req.task_id, &req.task_id, &fault)?;
        Ok(Response::new(TaskGetCommandRouterAccessResponse {
            jwt: access.jwt,
            url: access.url,
        }))
    }

    async fn sandbox_get_command_router_access(
        &self,
        request: Request<SandboxGetCommandRouterAccessRequest>,
    ) -> Result<Response<SandboxGetCommandRouterAccessResponse>, Status> {
        let fault = self.admit(
            request.metadata(),
            "SandboxGetCommandRouterAccess",
            Route::SandboxGetCommandRouterAccess,
        )?;
        use sandbox_get_command_router_access_request::Target;
        let access = match request.into_inner().target {
            Some(Target::SandboxId(id)) => self.router_access(|s| s.id == id, &id, &fault)?,
            Some(Target::TaskId(id)) => self.router_access(|s| s.task_id == id, &id, &fault)?,
            None => {
                return Err(Status::invalid_argument(
                    "sandbox_id or task_id is required",
                ));
            }
        };
        Ok(Response::new(SandboxGetCommandRouterAccessResponse {
            jwt: access.jwt,
            url: access.url,
            worker_ipv4_address: "127.0.0.1".into(),
        }))
    }

    async fn container_exec(
        &self,
        request: Request<ContainerExecRequest>,
    ) -> Result<Response<ContainerExecResponse>, Status> {
        self.admit(request.metadata(), "ContainerExec", Route::ContainerExec)?;
        self.legacy_exec(request.into_inner()).map(Response::new)
    }

    type ContainerExecGetOutputStream = super::legacy::OutputStream;

    async fn container_exec_get_output(
        &self,
        request: Request<ContainerExecGetOutputRequest>,
    ) -> Result<Response<super::legacy::OutputStream>, Status> {
        let fault = self.admit(
            request.metadata(),
            "ContainerExecGetOutput",
            Route::ContainerExecGetOutput,
        )?;
        self.legacy_output(request.into_inner(), fault)
            .map(Response::new)
    }

    async fn container_exec_put_input(
        &self,
        request: Request<ContainerExecPutInputRequest>,
    ) -> Result<Response<()>, Status> {
        self.admit(
            request.metadata(),
            "ContainerExecPutInput",
            Route::ContainerExecPutInput,
        )?;
        self.legacy_input(request.into_inner()).await?;
        Ok(Response::new(()))
    }

    async fn container_exec_wait(
        &self,
        request: Request<ContainerExecWaitRequest>,
    ) -> Result<Response<ContainerExecWaitResponse>, Status> {
        self.admit(
            request.metadata(),
            "ContainerExecWait",
            Route::ContainerExecWait,
        )?;
        self.legacy_wait(request.into_inner())
            .await
            .map(Response::new)
    }
}
