//! Thin tonic handlers: decode → domain call → encode.
use crate::domain::Domain;
use crate::error::Error;
use crate::limits::Limits;
use crate::security::Confinement;
use crate::wire;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;
use trellis_core::ids::WorkerId;
use trellis_proto::v1 as pb;

pub type Shared = Arc<Mutex<Domain>>;

/// How long a call that promises durability (submit, grow, pause, resume) waits for its state
/// to reach the store, after releasing the domain lock, before answering UNAVAILABLE (the write
/// stays queued and is retried).
pub const DURABLE_WAIT: Duration = Duration::from_secs(30);

/// Run `f` under the domain lock, then — lock released — wait until what it changed is durable.
async fn durably<T>(
    shared: &Shared,
    f: impl AsyncFnOnce(&mut Domain) -> crate::Result<T>,
) -> Result<T, Status> {
    let (out, ticket) = {
        let mut d = shared.lock().await;
        let out = f(&mut d).await?;
        (out, d.ticket())
    };
    ticket.wait_for(DURABLE_WAIT).await?;
    Ok(out)
}

fn job_id(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The control service; the second field confines submitted specs' paths (`None`: not
/// confined, a plaintext coordinator without `--allowed-root`), the third bounds `Watch`
/// streams.
#[derive(Clone)]
pub struct ControlSvc(pub Shared, pub Option<Arc<Confinement>>, pub Limits);

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_service_server::ControlService for ControlSvc {
    async fn submit_job(
        &self,
        r: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let r = r.into_inner();
        if let Some(c) = &self.1 {
            c.check_spec(&r.spec_toml, &r.base_dir)?;
        }
        Ok(Response::new(
            durably(&self.0, async |d| d.submit(&r.spec_toml, &r.base_dir).await).await?,
        ))
    }

    async fn get_status(
        &self,
        r: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(
            self.0.lock().await.status(job_id(&r.get_ref().job_id))?,
        ))
    }

    async fn list_workers(
        &self,
        _r: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Ok(Response::new(pb::ListWorkersResponse {
            workers: self.0.lock().await.list_workers(),
        }))
    }

    async fn grow(
        &self,
        r: Request<pb::GrowRequest>,
    ) -> Result<Response<pb::GrowResponse>, Status> {
        let r = r.into_inner();
        let req = wire::grow_request(&r)?;
        // A checkpoint commit in flight takes well under a second: wait for it (bounded) rather
        // than refuse the operator's growth.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (res, ticket) = {
                let mut d = self.0.lock().await;
                let res = d.grow(job_id(&r.job_id), req.clone()).await;
                (res, d.ticket())
            };
            match res {
                Err(Error::Busy(_)) if tokio::time::Instant::now() < deadline => {}
                Err(e) => return Err(e.into()),
                // Accepted: answer once the growth record is durable.
                Ok(resp) => {
                    ticket.wait_for(DURABLE_WAIT).await?;
                    return Ok(Response::new(resp));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn pause(
        &self,
        r: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::PauseResponse>, Status> {
        let id = job_id(&r.get_ref().job_id);
        let command_id = durably(&self.0, async |d| d.pause(id).await).await?;
        Ok(Response::new(pb::PauseResponse { command_id }))
    }

    async fn resume(
        &self,
        r: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ResumeResponse>, Status> {
        let id = job_id(&r.get_ref().job_id);
        let command_id = durably(&self.0, async |d| d.resume(id).await).await?;
        Ok(Response::new(pb::ResumeResponse { command_id }))
    }

    async fn save_checkpoint(
        &self,
        r: Request<pb::SaveCheckpointRequest>,
    ) -> Result<Response<pb::SaveCheckpointResponse>, Status> {
        let command_id = self
            .0
            .lock()
            .await
            .save_checkpoint(job_id(&r.get_ref().job_id))
            .await?;
        Ok(Response::new(pb::SaveCheckpointResponse { command_id }))
    }

    async fn list_checkpoints(
        &self,
        r: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: self
                .0
                .lock()
                .await
                .checkpoints(job_id(&r.get_ref().job_id))?,
        }))
    }

    async fn get_loss(
        &self,
        r: Request<pb::GetLossRequest>,
    ) -> Result<Response<pb::GetLossResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(
            self.0
                .lock()
                .await
                .loss(job_id(&r.job_id), r.max_points as usize)?,
        ))
    }

    async fn plan(
        &self,
        r: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(
            self.0.lock().await.plan(r.params, r.tokens, r.factor)?,
        ))
    }

    type WatchStream = StatusStream;

    async fn watch(
        &self,
        r: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = r.into_inner().job_id;
        // Held by the stream's task: released when the client goes away.
        let slot = self.2.watch_slot()?;
        let (first, mut changes) = {
            let d = self.0.lock().await;
            (d.status(job_id(&id))?, d.subscribe())
        };
        let shared = self.0.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _slot = slot;
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                // A client that went away frees its slot at once, not at the next change.
                tokio::select! {
                    _ = tx.closed() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                // Throttle: at most ~10 updates per second.
                tokio::time::sleep(Duration::from_millis(100)).await;
                changes.borrow_and_update();
                let st = shared
                    .lock()
                    .await
                    .status(job_id(&id))
                    .map_err(Status::from);
                if tx.send(st).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[derive(Clone)]
pub struct WorkerSvc(pub Shared);

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerSvc {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        r: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // With mTLS the client certificate names the worker id (AuthLayer admitted only worker
        // certificates here): a session may only be opened as that id.
        let certified = trellis_auth::request_identity(&r).map(|id| id.name().to_string());
        let mut inbound = r.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                ))
            }
            Some(Err(e)) => return Err(e),
            None => return Err(Status::invalid_argument("session closed before Hello")),
        };
        if let Some(id) = certified.filter(|id| *id != hello.worker_id) {
            warn!(certificate = %id, claimed = %hello.worker_id, "refused a worker session claiming another worker id");
            return Err(Status::permission_denied(format!(
                "worker session refused: Hello names worker id {:?} but the client certificate \
                 is worker {id:?}; a worker may only open a session as the id in its certificate \
                 (`coordctl certs worker ID DIR`)",
                hello.worker_id
            )));
        }
        let worker = WorkerId(hello.worker_id.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let session = self.0.lock().await.hello(hello, tx).await?;
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                let mut d = shared.lock().await;
                let res = match msg.kind {
                    Some(pb::worker_message::Kind::Step(s)) => {
                        d.step_report(&worker, session, s).await
                    }
                    Some(pb::worker_message::Kind::Ack(a)) => {
                        d.ack(&worker, session, wire::ack(a)).await
                    }
                    Some(pb::worker_message::Kind::ValLoss(v)) => {
                        d.val_loss(&worker, session, v);
                        Ok(())
                    }
                    Some(pb::worker_message::Kind::Heartbeat(hb)) => {
                        d.heartbeat(&worker, session, &hb);
                        Ok(())
                    }
                    Some(pb::worker_message::Kind::NcclIds(o)) => match wire::nccl_ids(&o.ids) {
                        Ok(ids) => d.nccl_offer(&worker, session, ids).await,
                        Err(e) => Err(e),
                    },
                    Some(pb::worker_message::Kind::Hello(_)) | None => Ok(()),
                };
                if let Err(e) = res {
                    warn!(worker_id = %worker, "handling a worker message failed: {e}");
                }
            }
            if let Err(e) = shared.lock().await.disconnected(&worker, session).await {
                warn!(worker_id = %worker, "handling a disconnect failed: {e}");
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}
