//! What a retrieval mistake got wrong, on samples that carry their scene (the synthetic set's
//! `.json` `scene`): for each image whose top-ranked caption is not its own, the attributes by
//! which that caption's scene differs from the image's. Recall says how often the model is
//! wrong; this says about what (shape, color, count, size, the relation), which is where a
//! recipe change has to act.

use std::collections::BTreeMap;

use rookery_data::synth::scene::inverse_relation;
use serde_json::Value;

/// One group of a scene as the labels store it: (count, size, color, shape).
type Group = [u64; 4];
/// What a caption can say of a scene: its groups and the relation of the first to the second.
type Content = (Vec<Group>, Option<u64>);
const FIELDS: [&str; 4] = ["count", "size", "color", "shape"];

/// A scene's groups and relation, read from the labels' `scene`; `None` without one.
fn scene(label: &Option<Value>) -> Option<Content> {
    let s = label.as_ref()?.get("scene")?;
    let groups = s
        .get("groups")?
        .as_array()?
        .iter()
        .map(|g| {
            let mut out = [0u64; 4];
            for (o, f) in out.iter_mut().zip(FIELDS) {
                *o = g.get(f)?.as_u64()?;
            }
            Some(out)
        })
        .collect::<Option<Vec<_>>>()?;
    Some((groups, s.get("relation").and_then(Value::as_u64)))
}

/// The names of what differs between two scenes, under the better of the two ways to pair
/// their groups ("a above b" and "b below a" say the same thing).
pub fn differences(a: &Content, b: &Content) -> Vec<&'static str> {
    if a.0.len() != b.0.len() {
        return vec!["number of groups"];
    }
    let diff = |ga: &[Group], gb: &[Group], ra: Option<u64>, rb: Option<u64>| {
        let mut out: Vec<&'static str> = FIELDS
            .iter()
            .enumerate()
            .filter(|&(i, _)| ga.iter().zip(gb).any(|(x, y)| x[i] != y[i]))
            .map(|(_, f)| *f)
            .collect();
        if ra != rb {
            out.push("relation");
        }
        out
    };
    let direct = diff(&a.0, &b.0, a.1, b.1);
    if a.0.len() < 2 {
        return direct;
    }
    let swapped: Vec<Group> = b.0.iter().rev().copied().collect();
    let inverse = b.1.map(|r| inverse_relation(r as usize % 4) as u64);
    let other = diff(&a.0, &swapped, a.1, inverse);
    if other.len() < direct.len() {
        other
    } else {
        direct
    }
}

/// Counts of image->text top-1 mistakes by what differs: the attributes' names joined by `+`
/// (in the order count, size, color, shape, relation). `top1[i]` is the caption ranked first
/// for image `i`. Empty when the samples carry no scenes.
pub fn top1_confusions(labels: &[Option<Value>], top1: &[usize]) -> BTreeMap<String, usize> {
    let scenes: Vec<_> = labels.iter().map(scene).collect();
    let mut out = BTreeMap::new();
    for (i, &j) in top1.iter().enumerate() {
        if i == j {
            continue;
        }
        let (Some(a), Some(b)) = (&scenes[i], &scenes[j]) else {
            continue;
        };
        let d = differences(a, b);
        let key = match d.as_slice() {
            [] => "nothing (same content)".to_string(),
            _ => d.join("+"),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn label(groups: Value, relation: Value) -> Option<Value> {
        Some(json!({ "scene": { "groups": groups, "relation": relation } }))
    }

    fn g(count: u64, size: u64, color: u64, shape: u64) -> Value {
        json!({ "count": count, "size": size, "color": color, "shape": shape })
    }

    #[test]
    fn mistakes_are_named_by_what_differs() {
        let labels = vec![
            label(json!([g(1, 0, 2, 3)]), Value::Null),
            label(json!([g(1, 0, 2, 4)]), Value::Null), // shape
            label(json!([g(1, 0, 2, 3), g(2, 1, 0, 0)]), json!(0)),
            // the same scene said the other way round, then with the relation turned
            label(json!([g(2, 1, 0, 0), g(1, 0, 2, 3)]), json!(1)),
            label(json!([g(2, 1, 0, 0), g(1, 0, 2, 3)]), json!(0)),
            label(json!([g(3, 1, 5, 0), g(1, 0, 2, 3)]), json!(0)),
            None,
        ];
        // image 0 -> caption 1 (shape); 1 -> 1 (right); 2 -> 3 (same content); 3 -> 4
        // (relation); 4 -> 0 (number of groups); 5 -> 4 (count and color); 6 has no scene.
        let c = top1_confusions(&labels, &[1, 1, 3, 4, 0, 4, 0]);
        let want: BTreeMap<String, usize> = [
            ("shape", 1),
            ("nothing (same content)", 1),
            ("relation", 1),
            ("number of groups", 1),
            ("count+color", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(c, want);
    }
}
