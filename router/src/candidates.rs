//! The ready workers of one model for one leg, kept ordered by worker id, with each worker's
//! effective load and policy score, and a tournament tree over the scores so that the best
//! candidate is known in O(1) and a score change costs O(log n).

use std::sync::Arc;

use crate::types::Load;

/// Ready workers that can run one leg, as policies see them. Index `i` refers to the same worker in
/// every accessor; indices are ordered by worker id, so "lowest index" is a deterministic tie-break.
#[derive(Debug, Default)]
pub struct Candidates {
    ids: Vec<Arc<str>>,
    slots: Vec<u32>,
    loads: Vec<Load>,
    scores: MinTree,
}

impl Candidates {
    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there is no candidate.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Worker ids, ascending.
    pub fn worker_ids(&self) -> &[Arc<str>] {
        &self.ids
    }

    /// Effective loads: last report plus work placed since.
    pub fn loads(&self) -> &[Load] {
        &self.loads
    }

    /// Policy scores (lower is better), as of each worker's last load change.
    pub fn scores(&self) -> &[u64] {
        &self.scores.keys[..self.scores.len]
    }

    /// Index of the lowest score, the lowest index among equals; `None` when empty.
    pub fn best(&self) -> Option<usize> {
        self.scores.best()
    }

    pub(crate) fn slot(&self, i: usize) -> u32 {
        self.slots[i]
    }

    pub(crate) fn position(&self, id: &str) -> Result<usize, usize> {
        self.ids.binary_search_by(|probe| (**probe).cmp(id))
    }

    /// Adds a worker (or replaces the entry of the same id).
    pub(crate) fn upsert(&mut self, id: Arc<str>, slot: u32, load: Load, score: u64) {
        match self.position(&id) {
            Ok(i) => self.set(i, load, score),
            Err(i) => {
                self.ids.insert(i, id);
                self.slots.insert(i, slot);
                self.loads.insert(i, load);
                let mut keys = self.scores().to_vec();
                keys.insert(i, score);
                self.scores = MinTree::build(keys);
            }
        }
    }

    /// Removes a worker; true when it was present.
    pub(crate) fn remove(&mut self, id: &str) -> bool {
        let Ok(i) = self.position(id) else {
            return false;
        };
        self.ids.remove(i);
        self.slots.remove(i);
        self.loads.remove(i);
        let mut keys = self.scores().to_vec();
        keys.remove(i);
        self.scores = MinTree::build(keys);
        true
    }

    /// Replaces one entry's load and score.
    pub(crate) fn set(&mut self, i: usize, load: Load, score: u64) {
        self.loads[i] = load;
        self.scores.update(i, score);
    }
}

/// A complete binary tree whose leaves are scores and whose inner nodes hold the index of the
/// smallest leaf below them (smaller index on ties). Padding leaves hold `u64::MAX` and an index
/// past every real one, so they lose every comparison against a real leaf.
#[derive(Debug, Default)]
struct MinTree {
    /// Leaf scores, padded to `width`.
    keys: Vec<u64>,
    /// `nodes[1]` is the root; leaf `i` is `nodes[width + i]`.
    nodes: Vec<u32>,
    width: usize,
    len: usize,
}

impl MinTree {
    fn build(mut keys: Vec<u64>) -> Self {
        let len = keys.len();
        let width = len.next_power_of_two();
        keys.resize(width, u64::MAX);
        let mut nodes = vec![0u32; 2 * width];
        for (i, node) in nodes[width..].iter_mut().enumerate() {
            *node = i as u32;
        }
        let mut tree = MinTree {
            keys,
            nodes,
            width,
            len,
        };
        for n in (1..width).rev() {
            tree.nodes[n] = tree.winner(tree.nodes[2 * n], tree.nodes[2 * n + 1]);
        }
        tree
    }

    fn winner(&self, a: u32, b: u32) -> u32 {
        if (self.keys[b as usize], b) < (self.keys[a as usize], a) {
            b
        } else {
            a
        }
    }

    fn best(&self) -> Option<usize> {
        (self.len > 0).then(|| self.nodes[1] as usize)
    }

    fn update(&mut self, i: usize, key: u64) {
        self.keys[i] = key;
        let mut n = (self.width + i) / 2;
        while n >= 1 {
            self.nodes[n] = self.winner(self.nodes[2 * n], self.nodes[2 * n + 1]);
            n /= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(scores: &[u64]) -> Candidates {
        let mut t = Candidates::default();
        for (i, &s) in scores.iter().enumerate() {
            t.upsert(Arc::from(format!("w{i:02}")), i as u32, Load::default(), s);
        }
        t
    }

    #[test]
    fn best_is_lowest_score_then_lowest_id() {
        assert_eq!(Candidates::default().best(), None);
        assert_eq!(table(&[5]).best(), Some(0));
        assert_eq!(table(&[5, 3, 3, 9]).best(), Some(1));
        assert_eq!(table(&[u64::MAX, u64::MAX, u64::MAX]).best(), Some(0));
    }

    #[test]
    fn updates_move_the_best() {
        let mut t = table(&[5, 3, 7, 4, 6]);
        t.set(1, Load::default(), 10);
        assert_eq!(t.best(), Some(3));
        t.set(4, Load::default(), 0);
        assert_eq!(t.best(), Some(4));
        t.set(4, Load::default(), 4);
        assert_eq!(t.best(), Some(3), "tie at 4 goes to the lower index");
        assert_eq!(t.scores(), &[5, 10, 7, 4, 4]);
    }

    #[test]
    fn insertion_and_removal_keep_id_order_and_scores() {
        let mut t = Candidates::default();
        t.upsert(Arc::from("b"), 1, Load::default(), 2);
        t.upsert(Arc::from("d"), 3, Load::default(), 1);
        t.upsert(Arc::from("a"), 0, Load::default(), 2);
        t.upsert(Arc::from("c"), 2, Load::default(), 1);
        let ids: Vec<&str> = t.worker_ids().iter().map(|s| &**s).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(t.scores(), &[2, 2, 1, 1]);
        assert_eq!(t.best(), Some(2));
        assert_eq!(t.slot(2), 2);
        assert!(t.remove("c"));
        assert!(!t.remove("c"));
        assert_eq!(t.best(), Some(2), "d, now at index 2");
        assert_eq!(&*t.worker_ids()[2], "d");
        assert!(t.remove("d"));
        assert_eq!(t.best(), Some(0));
        assert!(t.remove("a") && t.remove("b"));
        assert_eq!(t.best(), None);
    }

    #[test]
    fn tree_agrees_with_a_scan_after_many_updates() {
        let mut t = table(&[0; 37]);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % 37) as usize;
            t.set(i, Load::default(), (x >> 20) % 50);
            let scan = (0..37).min_by_key(|&j| (t.scores()[j], j));
            assert_eq!(t.best(), scan);
        }
    }
}
