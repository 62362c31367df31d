//! VQA accuracy as the VQA challenge and OpenFlamingo's evaluation compute it.
//!
//! A prediction and each of the (usually ten) human answers are normalised the same way
//! ([`normalize`]); then for each human answer, the prediction scores `min(1, matches / 3)`
//! against the *other* answers, and the question's accuracy is the mean over those leave-one-out
//! subsets. So an answer three or more of the other annotators gave scores 1.
//!
//! The normalisation, in the order the reference code applies it:
//! 1. newlines and tabs become spaces; surrounding spaces go;
//! 2. punctuation (`; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !`): a mark is *removed* when the
//!    text has it next to a space or holds a digit-comma-digit anywhere, else *replaced by a
//!    space* (the test looks at the text before any mark was handled);
//! 3. every `.` not followed by a digit is removed (`3.5` stays);
//! 4. lower-cased words; number words zero to ten become digits (`none` becomes `0`), the
//!    articles `a`, `an`, `the` are dropped, and apostrophe-less contractions get their
//!    apostrophe (`dont` -> `don't`, [`CONTRACTIONS`]).
//!
//! Before scoring, a generated answer is cut as OpenFlamingo cuts it
//! ([`postprocess_generation`]). The committed fixture (fixtures/generate_captioning.py) checks
//! all of this against OpenFlamingo's `vqa_metric.py`.

/// The marks of step 2.
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

const NUMBERS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// Contractions written without their apostrophe, and how the reference writes them.
pub const CONTRACTIONS: [(&str, &str); 120] = [
    ("'ow'sat", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("I'dve", "I'd've"),
    ("Id've", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt", "couldn't"),
    ("couldnt've", "couldn't've"),
    ("couldve", "could've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadn'tve", "hadn't've"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("he'dve", "he'd've"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("isnt", "isn't"),
    ("it'dve", "it'd've"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightn'tve", "mightn't've"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("shant", "shan't"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shed've", "she'd've"),
    ("shouldn'tve", "shouldn't've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldve", "should've"),
    ("somebody'd", "somebodyd"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyd've", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someone'dve", "someone'd've"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("something'dve", "something'd've"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("there'dve", "there'd've"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("they'dve", "they'd've"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("we'dve", "we'd've"),
    ("wed've", "we'd've"),
    ("werent", "weren't"),
    ("weve", "we've"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("who'dve", "who'd've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldn'tve", "wouldn't've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldve", "would've"),
    ("y'all'dve", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'allll", "y'all'll"),
    ("yall", "y'all"),
    ("yall'd've", "y'all'd've"),
    ("yall'll", "y'all'll"),
    ("you'dve", "you'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// An answer as the VQA evaluation compares answers (see the module docs).
pub fn normalize(answer: &str) -> String {
    let text = answer.replace(['\n', '\t'], " ");
    let text = text.trim();
    let text = punctuation(text);
    digits_and_articles(&text)
}

/// Step 2 and 3.
fn punctuation(text: &str) -> String {
    let digit_comma_digit = text
        .as_bytes()
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for p in PUNCT {
        let spaced = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        let with = if spaced || digit_comma_digit { "" } else { " " };
        out = out.replace(p, with);
    }
    let chars: Vec<char> = out.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c != '.' || chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        .map(|(_, &c)| c)
        .collect()
}

/// Step 4.
fn digits_and_articles(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split_whitespace()
        .map(|w| NUMBERS.iter().find(|(k, _)| *k == w).map_or(w, |(_, d)| d))
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, c)| c)
        })
        .collect();
    words.join(" ")
}

/// The accuracy of `prediction` against the human `answers` of one question, both
/// normalised here.
pub fn accuracy(prediction: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let pred = normalize(prediction);
    let gts: Vec<String> = answers.iter().map(|a| normalize(a)).collect();
    let per_left_out: f64 = (0..gts.len())
        .map(|i| {
            let matches = (0..gts.len()).filter(|&j| j != i && gts[j] == pred).count();
            (matches as f64 / 3.0).min(1.0)
        })
        .sum();
    per_left_out / gts.len() as f64
}

/// A generated continuation cut to its answer, as OpenFlamingo does before scoring: before
/// the first `Question`, `Answer` or `Short` (the model starting the next demonstration),
/// then before the first `", "`.
pub fn postprocess_generation(text: &str) -> &str {
    let cut = ["Question", "Answer", "Short"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    let text = &text[..cut];
    text.split(", ").next().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_by_hand() {
        assert_eq!(normalize("Two dogs."), "2 dogs");
        assert_eq!(normalize("  The Red-Ball\n"), "red ball");
        assert_eq!(normalize("yes, it is"), "yes it is");
        assert_eq!(normalize("3.5"), "3.5");
        assert_eq!(normalize("1,000"), "1000");
        assert_eq!(normalize("dont know"), "don't know");
        assert_eq!(normalize("an apple"), "apple");
    }

    #[test]
    fn accuracy_is_the_mean_over_leaving_each_annotator_out() {
        let ans = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Three annotators say "2": leaving one of them out leaves two matches (2/3), leaving
        // any other out leaves three (1): (3 * 2/3 + 7 * 1) / 10.
        let a = ans(&["2", "two", "2", "3", "3", "3", "3", "4", "4", "4"]);
        assert!((accuracy("2", &a) - 0.9).abs() < 1e-12);
        assert!((accuracy("four", &a) - 0.9).abs() < 1e-12);
        let four_3 = ans(&["3", "3", "3", "3", "x", "x", "x", "x", "x", "x"]);
        assert_eq!(accuracy("3", &four_3), 1.0);
        assert_eq!(accuracy("5", &four_3), 0.0);
    }

    #[test]
    fn generations_are_cut_before_the_next_demonstration() {
        assert_eq!(
            postprocess_generation("a red bus Question: what"),
            "a red bus "
        );
        assert_eq!(postprocess_generation("yes, it is"), "yes");
        assert_eq!(postprocess_generation("blue"), "blue");
    }
}
