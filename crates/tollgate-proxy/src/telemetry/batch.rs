//! The spans of a JSON-RPC batch's members, each with its own server span and,
//! when forwarded, its own client span.

use opentelemetry::Context;
use serde_json::Value;

use super::spans::{Upstream, failed, upstream_under};

/// The spans of a JSON-RPC batch's members (`telemetry:`): each member is a message with
/// its own server span, decided inside it; each forwarded member has its own client span,
/// child of its server span, carried in its `params._meta` (the batch has one HTTP
/// exchange, so no `traceparent` header speaks for all of them). Kept until the batch is
/// answered; a call's permit keeps its own spans until its outcome.
#[derive(Default)]
pub struct Batch {
    members: Vec<Member>,
}

struct Member {
    server: Context,
    /// Its index among the forwarded messages, and among the permits.
    forwarded: Option<(usize, Option<usize>)>,
    upstream: Option<Upstream>,
}

impl Batch {
    /// Keeps a member's server span; `forwarded`: its index among the messages sent
    /// upstream and, for a call, among the permits. `refused`: why the batch answered it
    /// itself, when no decision span said so.
    pub fn member(
        &mut self,
        server: Context,
        forwarded: Option<(usize, Option<usize>)>,
        refused: Option<&str>,
    ) {
        if let Some(kind) = refused {
            failed(&server, kind);
        }
        self.members.push(Member {
            server,
            forwarded,
            upstream: None,
        });
    }

    /// Opens each forwarded member's client span and, when its trace is sampled, puts the
    /// span's context in that member's `params._meta` in `forward`; `link` gets the index
    /// of each call's permit with its exchange.
    pub fn send(
        &mut self,
        server: &str,
        pipe: bool,
        forward: &mut [Value],
        mut link: impl FnMut(usize, &Upstream),
    ) {
        for member in &mut self.members {
            let Some((at, permit)) = member.forwarded else {
                continue;
            };
            let Some(message) = forward.get_mut(at) else {
                continue;
            };
            let Some(span) = upstream_under(member.server.clone(), server, Some(message), pipe)
            else {
                continue;
            };
            if let Some(traced) = span.message(message) {
                *message = traced;
            }
            if let Some(permit) = permit {
                link(permit, &span);
            }
            member.upstream = Some(span);
        }
    }

    /// The batch failed as a whole (`error.type`: the JSON-RPC code): its forwarded
    /// members' spans say so.
    pub fn failed(&self, code: i64) {
        let code = code.to_string();
        for member in self.members.iter().filter(|m| m.forwarded.is_some()) {
            failed(&member.server, &code);
            if let Some(upstream) = &member.upstream {
                upstream.failed(&code);
            }
        }
    }
}
