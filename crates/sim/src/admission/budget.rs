//! What a request asks for (budgets and a priority) and what admission answers.

/// How much a request matters when capacity is short. Critical requests are ordered first in the
/// router's queue; sheddable ones must leave headroom and are shed first; all three are rejected
/// when their budget cannot be met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    Critical,
    #[default]
    Standard,
    Sheddable,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Standard, Priority::Sheddable];

    /// The header's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }

    /// Parses the header's spelling (exact, lower case).
    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A request's latency objectives, in seconds. `None`: no objective of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Budget {
    /// Time to first token, from arrival at the router.
    pub ttft: Option<f64>,
    /// Time per output token after the first (inter-token latency).
    pub itl: Option<f64>,
    pub priority: Priority,
}

/// The shape of the request to admit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ask {
    pub prompt_tokens: u32,
    pub max_new_tokens: u32,
    pub budget: Budget,
}

/// Why a request was refused. Each is an OpenAI error `code` at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// No candidate can give the first token within the TTFT budget, now or by the time the
    /// request could wait for.
    TtftBudgetUnreachable,
    /// No decode worker can take the sequence within its ITL budget (or without pushing a running
    /// sequence past its own) in the time the request could wait.
    ItlBudgetUnreachable,
    /// The router's queue is full of work at least as urgent.
    QueueFull,
}

impl RejectReason {
    pub const ALL: [RejectReason; 3] = [
        RejectReason::TtftBudgetUnreachable,
        RejectReason::ItlBudgetUnreachable,
        RejectReason::QueueFull,
    ];

    /// The error code clients see.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::TtftBudgetUnreachable => "ttft_budget_unreachable",
            RejectReason::ItlBudgetUnreachable => "itl_budget_unreachable",
            RejectReason::QueueFull => "queue_full",
        }
    }
}

/// Admission's answer for one request against its best candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Place it now.
    Admit,
    /// Nothing fits now, but waiting up to `for_s` seconds leaves its budget reachable (a decode
    /// worker's KV or ITL headroom is what it waits for, or it has no budget and the cluster is
    /// past its horizon).
    Wait { for_s: f64 },
    /// Refuse at once. `retry_after_s`: when the backlog is predicted to have drained enough for a
    /// retry to succeed; `None` when no wait would help (the budget is below what an idle cluster
    /// gives).
    Reject {
        reason: RejectReason,
        retry_after_s: Option<f64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_parse_their_own_spelling_only() {
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(Priority::parse("Critical"), None);
        assert_eq!(Priority::parse("high"), None);
        assert_eq!(Priority::parse(""), None);
        assert!(
            Priority::Critical < Priority::Standard && Priority::Standard < Priority::Sheddable
        );
    }
}
