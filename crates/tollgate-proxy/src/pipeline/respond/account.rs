//! The last response stage: each call's answer, as it passes, is checked against the
//! call's `results` rules ([`super::results`]) and finishes the call's [`Permit`] with
//! its outcome (`ok`, `tool_error`, `rpc_error`, `result_blocked`) and what was
//! redacted. A call whose answer never comes is finished with why (the stream broke,
//! the client went away).

use tollgate_mcp::Answered;

use serde_json::Value;

use super::Frame;
use super::results::Results;
use crate::pipeline::context::Context;
use crate::pipeline::decide::{Outcome, Permit};
use crate::telemetry;
use crate::upstream::Failure;

/// The outcome of a call whose exchange failed.
pub fn failed(failure: &Failure) -> Outcome {
    match failure {
        Failure::Unreachable(_) => Outcome::Unreachable,
        Failure::AtCapacity(_) => Outcome::AtCapacity,
        Failure::Timeout(_) => Outcome::Timeout,
        Failure::Broken(_) | Failure::TooLarge(_) => Outcome::Broken,
    }
}

/// The outcome an answer tells.
fn outcome_of(answered: Answered) -> Outcome {
    match answered {
        Answered::Ok => Outcome::Ok,
        Answered::ToolError => Outcome::ToolError,
        Answered::RpcError(code) => Outcome::RpcError(code),
    }
}

/// The calls of an answer still waiting for theirs. Each is finished when its answer
/// passes; when the answer ends first, or is dropped (the client went away), the calls
/// still waiting are finished with that.
pub struct Waiting {
    /// Each call, and whether `results` rules apply to its result.
    permits: Vec<(Permit, bool)>,
    /// The `results` rules, when some apply to one of the calls.
    results: Option<Box<Results>>,
}

impl Waiting {
    pub(super) fn new(ctx: &Context, permits: impl IntoIterator<Item = Permit>) -> Waiting {
        // One vector, built once: a lone call's answer allocates no more than that.
        let mut permits: Vec<(Permit, bool)> =
            permits.into_iter().map(|permit| (permit, false)).collect();
        // Only a policy with `results` entries is asked about each call's tool.
        let results = if permits.is_empty() {
            None
        } else {
            Results::of(ctx)
        };
        if let Some(results) = &results {
            for (permit, ruled) in &mut permits {
                *ruled = results.apply_to(permit.tool());
            }
        }
        let results = results
            .filter(|_| permits.iter().any(|(_, ruled)| *ruled))
            .map(Box::new);
        Waiting { permits, results }
    }

    /// No calls (an answer that carries none, in tests).
    #[cfg(test)]
    pub(super) fn none() -> Waiting {
        Waiting {
            permits: Vec::new(),
            results: None,
        }
    }

    /// Whether no call waits.
    pub(super) fn is_empty(&self) -> bool {
        self.permits.is_empty()
    }

    pub(super) fn start(&mut self, at: std::time::Instant) {
        for (permit, _) in &mut self.permits {
            permit.start(at);
        }
    }

    pub(super) fn sent(&mut self, span: &telemetry::Upstream) {
        for (permit, _) in &mut self.permits {
            if let Some(trace) = permit.trace() {
                trace.sent(span);
            }
        }
    }

    /// The answer has begun to stream (its headers came): the calls' latency ends here.
    pub(super) fn began(&mut self) {
        for (permit, _) in &mut self.permits {
            permit.answer_began();
        }
    }

    /// Reads `frame` for the calls' answers. `lone`: the frame is the whole answer, so
    /// a lone call's answer is that call's whatever id it carries (a parse error's is
    /// null).
    pub(super) fn note(&mut self, frame: &mut Frame, lone: bool) {
        if self.permits.is_empty() {
            return;
        }
        if self.results.is_some() {
            return self.note_ruled(frame, lone);
        }
        // A lone call's answer told without parsing: a plain result that, in a stream,
        // is not a message of the server's own (those have a `method`).
        if let (Some(text), [_]) = (frame.text(), &self.permits[..])
            && tollgate_mcp::plainly_ok(text)
            && (lone || !tollgate_mcp::names_method(text))
        {
            self.finish_all(Outcome::Ok);
            return;
        }
        let answers = match frame.text() {
            Some(text) => tollgate_mcp::answers_in(text),
            None => frame.value().map(tollgate_mcp::answers_of),
        };
        let Some(answers) = answers else {
            return;
        };
        if let ([(_, answered)], [_], true) = (&answers[..], &self.permits[..], lone) {
            let answered = *answered;
            self.finish_all(outcome_of(answered));
            return;
        }
        for (id, answered) in answers {
            if let Some(at) = self.permits.iter().position(|(p, _)| *p.request_id() == id) {
                self.permits.swap_remove(at).0.finish(outcome_of(answered));
            }
        }
    }

    /// [`Waiting::note`] when a call's result is to be checked: the frame is parsed,
    /// each ruled call's result scanned (and changed), and every call's answer read.
    fn note_ruled(&mut self, frame: &mut Frame, lone: bool) {
        let (permits, results) = (&mut self.permits, &self.results);
        frame.edit(|value| {
            let lone = lone && permits.len() == 1 && !value.is_array();
            let messages: Vec<&mut Value> = match value {
                Value::Array(items) => items.iter_mut().collect(),
                single => vec![single],
            };
            let mut changed = false;
            for message in messages {
                let Some(answered) = tollgate_mcp::answered(message) else {
                    continue;
                };
                let at = if lone {
                    Some(0)
                } else {
                    let id = message.get("id").unwrap_or(&Value::Null);
                    permits.iter().position(|(p, _)| p.request_id() == id)
                };
                let Some((mut permit, ruled)) = at.map(|at| permits.swap_remove(at)) else {
                    continue;
                };
                let mut outcome = outcome_of(answered);
                if let (true, Some(results), Some(result)) =
                    (ruled, results, message.get_mut("result"))
                    && let Some(verdict) = results.apply(permit.tool(), result)
                {
                    changed |= verdict.changed;
                    if verdict.blocked.is_some() {
                        outcome = Outcome::ResultBlocked;
                    }
                    permit.redacted(verdict.redactions);
                }
                permit.finish(outcome);
            }
            ((), changed)
        });
    }

    /// Finishes every call still waiting with `outcome`.
    pub(super) fn finish_all(&mut self, outcome: Outcome) {
        for (permit, _) in std::mem::take(&mut self.permits) {
            permit.finish(outcome);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.finish_all(Outcome::ClientGone);
    }
}

/// A frame of an answer's text, for tests.
#[cfg(test)]
pub(super) fn text_frame(text: &str) -> Frame {
    Frame::new(crate::upstream::Json::Text(bytes::Bytes::from(
        text.to_owned(),
    )))
}
