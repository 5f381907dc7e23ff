pub mod netns;
pub mod topo;
